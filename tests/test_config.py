"""Config: flags map one-to-one onto the frozen dataclasses; impossible settings fail, risky ones warn."""
import dataclasses
import json

import pytest

from config import Config, ConfigError, build_config, build_parser, replace_section


@pytest.fixture
def cohort_files(tmp_path):
    for name in ("train.csv", "val.csv"):
        (tmp_path / name).write_text("path,ich,patient_id\n")
    (tmp_path / "masks").mkdir()
    return ["--train_csv", str(tmp_path / "train.csv"), "--val_csv", str(tmp_path / "val.csv"),
            "--mask_dir", str(tmp_path / "masks")]


def test_defaults_match_the_documented_cli(cohort_files):
    config, _ = build_config(cohort_files)
    t, m = config.train, config.model
    assert (t.output_dir, t.epochs, t.batch_size, t.lr, t.weight_decay, t.patience) == \
        ("./outputs", 200, 2, 1e-4, 1e-4, 15)
    assert (t.gradient_accumulation_steps, t.max_grad_norm, t.scheduler_type) == (4, 1.0, "reduce_on_plateau")
    assert (m.visual_tokens, m.freeze_encoder, m.use_gradient_checkpointing) == (256, False, False)
    assert t.use_mixed_precision is False and config.log.use_wandb is False
    assert config.data.target_spacing == (1.5, 1.5, 1.5)


def test_every_flag_lands_in_its_field(cohort_files, tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    config, _ = build_config(cohort_files + ["--pretrained_checkpoint", str(weights), "--decoder_lr_scale", "0.5",
                                             "--scratch_lr", "1e-3", "--no-mask_refiner", "--normalization", "minmax",
        "--model", "tiny", "--epochs", "3", "--batch_size", "4", "--lr", "3e-4", "--use_mixed_precision",
        "--scheduler_type", "cosine", "--hu_window", "-50", "150", "--target_spacing", "2", "2", "3",
        "--freeze_encoder", "--use_gradient_checkpointing", "--visual_tokens", "128", "--use_wandb",
        "--wandb_project", "p", "--wandb_entity", "e", "--log_images", "--log_freq", "2", "--num_workers", "1",
        "--no-cache_in_memory", "--prompt_mode", "clicks", "--resume", "auto", "--seed", "7",
        "--allow_unusual_masks", "--false_positive_crop_fraction", "0.25", "--false_positive_mining_every", "5"])
    assert config.model.name == "tiny" and config.model.visual_tokens == 128
    assert config.model.freeze_encoder and config.model.use_gradient_checkpointing
    assert config.train.epochs == 3 and config.train.batch_size == 4 and config.train.lr == 3e-4
    assert config.train.use_mixed_precision and config.train.scheduler_type == "cosine"
    assert config.data.hu_window == (-50.0, 150.0) and config.data.target_spacing == (2.0, 2.0, 3.0)
    assert config.data.num_workers == 1 and config.data.cache_in_memory is False
    assert (config.log.use_wandb, config.log.wandb_project, config.log.wandb_entity) == (True, "p", "e")
    assert config.log.log_images and config.log.log_freq == 2
    assert config.train.prompt_mode == "clicks" and config.train.resume == "auto" and config.train.seed == 7
    assert config.model.pretrained_checkpoint == str(weights) and config.model.mask_refiner is False
    assert config.train.decoder_lr_scale == 0.5 and config.train.scratch_lr == 1e-3
    assert config.data.normalization == "minmax" and config.data.allow_unusual_masks
    assert config.data.false_positive_crop_fraction == 0.25 and config.train.false_positive_mining_every == 5
    assert build_config(cohort_files + ["--overwrite"])[0].train.overwrite


def test_fine_tuning_defaults_follow_the_pretrained_weights(cohort_files, tmp_path):
    """auto settings are resolved once, from the model and its weights, and written as resolved values."""
    turbo, _ = build_config(cohort_files)
    assert turbo.model.pretrained_checkpoint == "turbo"          # pretrained by default
    assert turbo.data.normalization == "sam_med3d"              # the input distribution the weights saw
    assert turbo.train.decoder_lr_scale == 0.1                  # SAM-Med3D's own decoder/encoder ratio
    scratch, warnings = build_config(cohort_files + ["--pretrained_checkpoint", "none"])
    assert scratch.model.pretrained_checkpoint is None and scratch.data.normalization == "zscore"
    assert scratch.train.decoder_lr_scale == 1.0
    assert any("from scratch" in w for w in warnings)
    tiny, _ = build_config(cohort_files + ["--model", "tiny"])
    assert (tiny.model.pretrained_checkpoint, tiny.data.normalization, tiny.train.decoder_lr_scale) == \
        (None, "zscore", 1.0)
    explicit, _ = build_config(cohort_files + ["--normalization", "zscore", "--decoder_lr_scale", "1"])
    assert explicit.data.normalization == "zscore" and explicit.train.decoder_lr_scale == 1.0
    assert Config.from_dict(json.loads(json.dumps(turbo.to_dict()))) == turbo
    # The library default stays explicit: a Config built in code does not download anything.
    assert Config().model.pretrained_checkpoint is None and Config().data.normalization == "zscore"


def test_freezing_an_encoder_without_weights_is_an_error(cohort_files):
    with pytest.raises(ConfigError, match="--freeze_encoder needs pretrained weights"):
        build_config(cohort_files + ["--model", "tiny", "--freeze_encoder"])
    with pytest.raises(ConfigError, match="--freeze_encoder needs pretrained weights"):
        build_config(cohort_files + ["--pretrained_checkpoint", "none", "--freeze_encoder"])


def test_config_is_frozen_and_round_trips_through_json(cohort_files):
    config, _ = build_config(cohort_files + ["--hu_window", "-10", "90"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 1.0
    again = Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    changed = replace_section(config, "train", epochs=5)
    assert changed.train.epochs == 5 and config.train.epochs == 200


def test_saved_config_is_verbatim(cohort_files, tmp_path):
    config, _ = build_config(cohort_files + ["--epochs", "9"])
    config.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["epochs"] == 9 and saved["data"]["target_spacing"] == [1.5, 1.5, 1.5]
    assert Config.from_dict(saved) == config


def test_a_saved_on_or_off_paste_into_negatives_reads_as_its_fraction():
    # Runs of the release that had --[no-]lesion_paste_into_negatives saved a bool; resuming them keeps its meaning.
    for saved, fraction in ((False, 0.0), (True, 1.0)):
        raw = Config().to_dict()
        raw["data"]["lesion_paste_into_negatives"] = saved
        value = Config.from_dict(json.loads(json.dumps(raw))).data.lesion_paste_into_negatives
        assert value == fraction and type(value) is float


def test_unknown_saved_key_is_an_error():
    raw = Config().to_dict()
    raw["train"]["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        Config.from_dict(raw)


def test_impossible_settings_are_all_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_config(["--train_csv", str(tmp_path / "nope.csv"), "--batch_size", "0", "--lr", "-1", "--scratch_lr", "0",
                      "--hu_window", "100", "0", "--augmentation_prob", "2", "--target_spacing", "1", "0", "1",
                      "--min_component_ml", "-1", "--decoder_loss_weight", "-0.5", "--hard_voxel_fraction", "0",
                      "--hard_negative_crop_fraction", "1.5", "--empty_crop_dice_volume", "-0.1",
                      "--min_component_peak", "1", "--hard_case_fraction", "-0.5", "--scale_augmentation", "1",
                      "--final_hemorrhage_weight", "0.5", "--false_positive_crop_fraction", "2",
                      "--false_positive_mining_every", "0", "--lesion_paste_into_negatives", "-1",
                      "--streak_augmentation_prob", "1.5"])
    problems = "\n".join(caught.value.problems)
    for expected in ("nope.csv: file not found", "--val_csv is required", "--mask_dir is required",
                     "--batch_size must be >= 1, got 0", "--lr must be > 0", "--hu_window needs low < high",
                     "--augmentation_prob must be in [0, 1]", "--target_spacing values must be > 0",
                     "--scratch_lr must be > 0", "--min_component_ml must be >= 0 mL",
                     "--decoder_loss_weight must be >= 0, got -0.5", "--hard_voxel_fraction must be in (0, 1], got 0",
                     "--hard_negative_crop_fraction must be in [0, 1], got 1.5",
                     "--empty_crop_dice_volume must be in [0, 1], got -0.1",
                     "--min_component_peak must be in [0.5, 1) (0.5 keeps every component), got 1.0",
                     "--hard_case_fraction must be in [0, 1], got -0.5",
                     "--scale_augmentation must be in [0, 1), got 1.0",
                     "--final_hemorrhage_weight must be in [1, 10], got 0.5",
                     "--false_positive_crop_fraction must be in [0, 1], got 2.0",
                     "--lesion_paste_into_negatives must be in [0, 1], got -1.0",
                     "--streak_augmentation_prob must be in [0, 1], got 1.5",
                     "--false_positive_mining_every must be >= 1, got 0"):
        assert expected in problems
    assert len(caught.value.problems) >= 8


def test_overwrite_and_resume_contradict_each_other(cohort_files):
    with pytest.raises(ConfigError, match="--overwrite and --resume auto contradict each other"):
        build_config(cohort_files + ["--overwrite", "--resume", "auto"])


def test_configs_saved_before_the_new_settings_still_load():
    raw = Config().to_dict()
    del raw["train"]["overwrite"], raw["data"]["allow_unusual_masks"], raw["model"]["min_component_ml"]
    del raw["train"]["decoder_loss_weight"], raw["model"]["min_component_peak"]
    config = Config.from_dict(raw)
    assert config.train.overwrite is False and config.data.allow_unusual_masks is False
    assert config.model.min_component_ml == 0.0  # older runs kept every component
    assert Config().model.min_component_ml == 0.3
    assert config.model.min_component_peak == 0.5  # ... and had no peak rule
    assert config.train.decoder_loss_weight == 0.0  # older runs trained without the decoder term (resume keeps it)
    assert Config().train.decoder_loss_weight == 0.3


def test_unknown_choice_is_rejected_not_replaced(cohort_files, capsys):
    with pytest.raises(SystemExit) as caught:
        build_config(cohort_files + ["--scheduler_type", "linear"])
    assert caught.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_exits_2_with_one_line_per_problem(tmp_path, capsys):
    import train

    code = train.main(["--train_csv", str(tmp_path / "missing.csv"), "--epochs", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "missing.csv: file not found" in err and "--epochs must be >= 1, got 0" in err


@pytest.mark.parametrize("flags, fragment", [
    (["--use_mixed_precision", "--device", "cpu"], "no effect on CPU"),
    (["--patience", "20", "--epochs", "10"], "early stopping can never trigger"),
    (["--batch_size", "16", "--gradient_accumulation_steps", "16"], "effective batch 256"),
    (["--lr", "0.01", "--model", "sam_med3d_turbo"], "high for fine-tuning"),
    (["--normalization", "sam_med3d", "--hu_window", "0", "100"], "--hu_window is not used"),
])
def test_risky_settings_warn(cohort_files, flags, fragment):
    _, warnings = build_config(cohort_files + ["--model", "tiny"] + flags)
    assert any(fragment in w for w in warnings), warnings


def test_a_high_rate_from_scratch_is_not_called_fine_tuning(cohort_files):
    _, warnings = build_config(cohort_files + ["--model", "tiny", "--lr", "0.01"])
    assert not any("fine-tuning" in w for w in warnings), warnings


def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
