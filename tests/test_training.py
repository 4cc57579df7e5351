"""The training loop on real (tiny) models and generated cohorts: accumulation, error recovery, resume, wandb.

The end-to-end learning check of the CLI lives in test_end_to_end.py; here each test drives one mechanism.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mining
import tracking
import train
from config import build_config
from data.loaders import EpochSampler
from inference import sliding_window_logits
from model import build_model
from trainer import LATEST_NAME, NonFiniteLossError, Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    from synthetic import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("cohort"), n_train=6, n_val=2, shape=(64, 64, 16),
                           spacing=(1.5, 1.5, 4.0), seed=3)


def cli_args(cohort, output_dir, *extra):
    return ["--train_csv", str(cohort.train_csv), "--val_csv", str(cohort.val_csv), "--mask_dir",
            str(cohort.mask_dir), "--output_dir", str(output_dir), "--model", "tiny", "--batch_size", "2",
            "--gradient_accumulation_steps", "2", "--lr", "1e-3", "--target_spacing", "3", "3", "3",
            "--num_workers", "0", "--device", "cpu", "--seed", "11", "--max_steps_per_epoch", "3",
            "--prompt_mode", "mixed", "--click_rounds", "2", "--scheduler_type", "cosine", *extra]


class ListLoader:
    """A DataLoader stand-in that yields fixed batches (so two runs see exactly the same data)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def fixed_batches(batch_size, count, seed=0, nan_at=()):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size * count, 1, 64, 64, 64, generator=generator)
    labels = torch.zeros_like(images)
    labels[::2, :, 20:40, 24:36, 30:44] = 1
    images = images + 2 * labels
    batches = []
    for i in range(count):
        part = slice(i * batch_size, (i + 1) * batch_size)
        image = images[part].clone()
        if i in nan_at:
            image[:] = float("nan")
        batches.append({"image": image, "label": labels[part].clone(),
                        "ich": labels[part].flatten(1).amax(1), "case_id": [f"c{i}"] * batch_size})
    return ListLoader(batches)


def make_trainer(tmp_path, loader, *flags):
    config, _ = build_config(["--test", "--model", "tiny", "--device", "cpu", "--output_dir", str(tmp_path),
                              "--lr", "1e-3", "--epochs", "1", *flags])
    torch.manual_seed(0)
    model = build_model(config.model)
    return Trainer(config, model, loader, ListLoader([]), torch.device("cpu"), tracking.NullTracker(), tmp_path)


def record_gradients(trainer):
    """Keep a copy of the gradients handed to each optimiser step (after unscaling and clipping)."""
    recorded = []
    real_step = trainer.scaler.step

    def step(optimizer, *args, **kwargs):
        recorded.append({name: p.grad.clone() for name, p in trainer.model.named_parameters()
                         if p.grad is not None})
        return real_step(optimizer, *args, **kwargs)

    trainer.scaler.step = step
    return recorded


@pytest.fixture
def float64_default():
    """Accumulation semantics in double precision: in float32 the refiner's zero-initialised output bias sums a
    million voxel gradients that nearly cancel, and the summation order alone moves it by ~0.5%."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, float64_default):
    one_big = make_trainer(tmp_path / "a", fixed_batches(4, 1), "--batch_size", "4",
                           "--gradient_accumulation_steps", "1", "--prompt_mode", "none")
    accumulated = make_trainer(tmp_path / "b", fixed_batches(1, 4), "--batch_size", "1",
                               "--gradient_accumulation_steps", "4", "--prompt_mode", "none")
    assert all(torch.equal(one_big.model.state_dict()[k], v) for k, v in accumulated.model.state_dict().items())
    big_grads, accumulated_grads = record_gradients(one_big), record_gradients(accumulated)
    one_big.train_epoch(0)
    accumulated.train_epoch(0)
    assert len(big_grads) == len(accumulated_grads) == 1
    assert set(big_grads[0]) == set(accumulated_grads[0]) and len(big_grads[0]) > 10
    for name, grad in big_grads[0].items():
        torch.testing.assert_close(accumulated_grads[0][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert sum(g.abs().sum() for g in big_grads[0].values()) > 0


def test_optimizer_is_fused_adamw_with_the_per_tensor_update(tmp_path):
    trainer = make_trainer(tmp_path, fixed_batches(2, 1))
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.optimizer.defaults["fused"] is True
    model = trainer.model
    before = copy.deepcopy(model)
    shadow = copy.deepcopy(model)
    shadow_of = {id(p): q for p, q in zip(model.parameters(), shadow.parameters())}
    # The same groups and settings, updated tensor by tensor.
    reference = torch.optim.AdamW([{**group, "params": [shadow_of[id(p)] for p in group["params"]], "fused": None,
                                    "foreach": False} for group in trainer.optimizer.param_groups])
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
            shadow_of[id(p)].grad = p.grad.clone()
        trainer.optimizer.step()
        reference.step()
    for (name, p), q, old in zip(model.named_parameters(), shadow.parameters(), before.parameters()):
        assert not torch.equal(p, old), name
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_short_last_group_steps(tmp_path):
    trainer = make_trainer(tmp_path, fixed_batches(1, 5), "--batch_size", "1", "--gradient_accumulation_steps",
                           "2", "--prompt_mode", "none")
    trainer.train_epoch(0)
    assert trainer.global_step == 3  # groups of 2, 2 and the short 1


def test_hard_case_weights_reach_the_loader_from_the_epochs_losses(tmp_path):
    """--hard_case_fraction: each epoch starts by handing the loader weights made from the losses of the epochs so
    far (uniform before any); without the flag the loader gets no weights at all."""
    loader = fixed_batches(1, 4)                                   # c0, c2 with blood; c1, c3 without
    loader.sampler = EpochSampler(None, case_ids=["c0", "c1", "c2", "c3"], case_ich=[1, 0, 1, 0])
    calls = []
    config, _ = build_config(["--test", "--model", "tiny", "--device", "cpu", "--output_dir", str(tmp_path),
                              "--batch_size", "1", "--gradient_accumulation_steps", "1", "--prompt_mode", "none",
                              "--hard_case_fraction", "1"])
    trainer = Trainer(config, build_model(config.model), loader, ListLoader([]), torch.device("cpu"),
                      tracking.NullTracker(), tmp_path, set_loader_epoch=lambda _, epoch, **kw: calls.append(kw))
    trainer.on_epoch_start(0)
    assert calls[0]["case_weights"] == pytest.approx([0.25] * 4)
    trainer.train_epoch(0)
    trainer.on_epoch_start(1)
    weights = calls[1]["case_weights"]
    assert set(trainer.hard_cases.running) == {"c0", "c1", "c2", "c3"}
    assert weights == pytest.approx(trainer.hard_cases.weights()) and weights != pytest.approx([0.25] * 4)
    assert weights[0] + weights[2] == pytest.approx(0.5)             # the scans with blood keep their share
    plain = make_trainer(tmp_path / "plain", fixed_batches(1, 1))
    plain.set_loader_epoch = lambda _, epoch, **kw: calls.append(kw)
    plain.on_epoch_start(0)
    assert plain.hard_cases is None and calls[-1] == {}


def test_each_epoch_starts_with_its_hemorrhage_weight_cap(tmp_path):
    """--final_hemorrhage_weight: the loss's cap is set from the epoch number at every epoch start (so a resumed run
    gets the cap of the epoch it resumes at); the default keeps the maximum throughout."""
    annealed = make_trainer(tmp_path / "annealed", fixed_batches(1, 1), "--epochs", "3", "--final_hemorrhage_weight",
                            "4")
    caps = []
    for epoch in (2, 0, 1):
        annealed.on_epoch_start(epoch)
        caps.append(annealed.loss_fn.hemorrhage_weight_cap)
    assert caps == pytest.approx([4.0, 10.0, 7.0])
    constant = make_trainer(tmp_path / "constant", fixed_batches(1, 1), "--epochs", "3")
    constant.on_epoch_start(2)
    assert constant.loss_fn.hemorrhage_weight_cap == pytest.approx(10.0)


def test_nonfinite_loss_is_skipped_then_aborts(tmp_path):
    trainer = make_trainer(tmp_path / "skip", fixed_batches(1, 4, nan_at=(1,)), "--batch_size", "1",
                           "--gradient_accumulation_steps", "1", "--prompt_mode", "none")
    stats = trainer.train_epoch(0)
    assert stats["nonfinite_skipped"] == 1 and trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    diverging = make_trainer(tmp_path / "abort", fixed_batches(1, 4, nan_at=(0, 1, 2, 3)), "--batch_size", "1",
                             "--gradient_accumulation_steps", "1", "--prompt_mode", "none",
                             "--max_nonfinite_steps", "3")
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses"):
        diverging.train_epoch(0)


def test_out_of_memory_batch_is_skipped_with_advice(tmp_path, caplog):
    trainer = make_trainer(tmp_path, fixed_batches(1, 3), "--batch_size", "1", "--gradient_accumulation_steps",
                           "1", "--prompt_mode", "none")
    real_forward = trainer.step_module.forward
    calls = {"n": 0}

    def flaky_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*args, **kwargs)

    trainer.step_module.forward = flaky_forward
    stats = trainer.train_epoch(0)
    assert stats["oom_skipped"] == 1 and trainer.global_step == 2
    assert "--use_gradient_checkpointing" in caplog.text and "--batch_size" in caplog.text


def final_weights(output_dir):
    return torch.load(output_dir / LATEST_NAME, map_location="cpu", weights_only=True)


def test_killed_run_resumes_to_the_same_result(small_cohort, tmp_path, monkeypatch):
    # The step schedule does not depend on --epochs, so a 1-epoch first run is a true prefix of the 3-epoch run. The
    # CPU recipe's sampling, augmentation and loss options are on, so their random draws are covered too.
    schedule = ("--scheduler_type", "step", "--step_size", "1", "--in_plane_rotation_deg", "180",
                "--hard_negative_crop_fraction", "0.5", "--empty_crop_dice_volume", "0.01",
                "--augmentation_prob", "0.5", "--hard_case_fraction", "0.5", "--lesion_paste_prob", "0.5",
                "--false_positive_crop_fraction", "0.5", "--false_positive_mining_every", "1")
    # A model this young calls nothing blood, so mining would find nothing: here it mines the 50 voxels it is
    # surest of outside the label, a function of the weights alone, as the real mining is.
    def surest_voxels(model, image, label, roi_size, amp_dtype, *args, **kwargs):
        logits = sliding_window_logits(model, image, roi_size, amp_dtype)[0, 0]
        logits[label[0, 0] > 0] = -torch.inf
        return np.sort(torch.topk(logits.flatten(), 50).indices.numpy()).astype(np.int32)

    monkeypatch.setattr(mining, "false_positive_voxels", surest_voxels)
    straight = tmp_path / "straight"
    assert train.main(cli_args(small_cohort, straight, "--epochs", "3", *schedule)) == 0

    # Stop twice: at an epoch boundary (a plain shorter run) and mid-epoch by SIGTERM after the 3rd optimiser step.
    interrupted = tmp_path / "interrupted"
    assert train.main(cli_args(small_cohort, interrupted, "--epochs", "1", *schedule)) == 0
    real_step = Trainer._optimizer_step

    def step_then_signal(self):
        real_step(self)
        if self.global_step == 3:
            self._stop_signal = signal.SIGTERM

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_signal)
    assert train.main(cli_args(small_cohort, interrupted, "--epochs", "3", "--resume", "auto", *schedule)) == 130
    saved = final_weights(interrupted)
    assert saved["epoch"] == 1 and saved["epoch_progress"]["batches_done"] == 2
    monkeypatch.setattr(Trainer, "_optimizer_step", real_step)
    assert train.main(cli_args(small_cohort, interrupted, "--epochs", "3", "--resume", "auto", *schedule)) == 0

    expected, resumed = final_weights(straight), final_weights(interrupted)
    assert resumed["epoch"] == expected["epoch"] == 3
    assert resumed["global_step"] == expected["global_step"]
    # Hard-case sampling: the losses of the epochs' scans (and the draws they weighted) survive both stops.
    assert resumed["hard_cases"]["running"] == pytest.approx(expected["hard_cases"]["running"], rel=1e-6)
    assert len(expected["hard_cases"]["running"]) >= 2 and expected["hard_cases"]["pending"] == []
    # False-positive mining: the interrupted epoch 2 kept the voxels mined at its start (not mined again with the
    # weights of mid-epoch), and epoch 3 mined from the same model.
    mined, mined_straight = resumed["false_positive_mining"], expected["false_positive_mining"]
    assert mined["mined_at"] == mined_straight["mined_at"] == 2
    assert mined["indices"].keys() == mined_straight["indices"].keys()
    assert all(torch.equal(mined["indices"][k], v) for k, v in mined_straight["indices"].items())
    assert len(mined_straight["indices"]) == 6
    for key, value in expected["model_state_dict"].items():
        assert torch.equal(resumed["model_state_dict"][key], value), f"{key} differs after resume"
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(
        [h["train_loss"] for h in expected["history"]], rel=1e-6)
    # metrics.csv is rewritten from the checkpointed history: each epoch once, after two interruptions too.
    for run in (straight, interrupted):
        assert [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()] == \
            ["epoch", "1", "2", "3"]
    # The checkpoint carries the preprocessing its model was trained with, as plain data.
    assert resumed["preprocessing"] == expected["preprocessing"] == {
        "hu_window": [-100.0, 200.0], "normalization": "zscore", "target_spacing": [3.0, 3.0, 3.0],
        "input_size": 64, "pipeline_version": 1}


def test_summary_json_and_wandb_offline_run_resumes(small_cohort, tmp_path):
    out = tmp_path / "run"
    snapshots = ("--save_every", "1", "--keep_checkpoints", "1")
    assert train.main(cli_args(small_cohort, out, "--epochs", "1", "--use_wandb", *snapshots)) == 0
    assert [p.name for p in out.glob("checkpoint_epoch_*.pth")] == ["checkpoint_epoch_0001.pth"]
    first = final_weights(out)
    run_id = first["wandb_run_id"]
    assert run_id and list((out / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert train.main(cli_args(small_cohort, out, "--epochs", "2", "--use_wandb", "--resume", "auto",
                               *snapshots)) == 0
    # --keep_checkpoints 1: only the newest epoch snapshot is left; latest and best are never removed.
    assert [p.name for p in out.glob("checkpoint_epoch_*.pth")] == ["checkpoint_epoch_0002.pth"]
    assert (out / "latest_model.pth").is_file() and (out / "best_model.pth").is_file()
    assert final_weights(out)["wandb_run_id"] == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}*"))) >= 2

    summaries = sorted(out.glob("training_summary_*.json"))
    assert len(summaries) == 2
    summary = json.loads(summaries[-1].read_text())
    for key in ("config", "dataset_stats", "history", "best_epoch", "best_val_dice", "best_metrics",
                "stop_reason", "total_time_s", "peak_memory", "system", "epochs_completed"):
        assert key in summary, key
    assert summary["epochs_completed"] == 2 and len(summary["history"]) == 2
    assert summary["stop_reason"] == "max_epochs"
    assert summary["config"]["train"]["epochs"] == 2
    assert summary["dataset_stats"]["n_scans"] == 8
    assert summary["dataset_stats"]["splits"]["train"]["scans"] == 6
    assert summary["best_epoch"] in (1, 2) and summary["best_metrics"]["epoch"] == summary["best_epoch"]
    assert 0 <= summary["data_wait_fraction"] <= 1
    assert summary["peak_memory"]["peak_rss_gb"] > 0
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,")


def test_corrupt_resume_checkpoint_exits_1_naming_the_file(small_cohort, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / LATEST_NAME).write_bytes(b"half-written garbage")
    assert train.main(cli_args(small_cohort, out, "--epochs", "1", "--resume", "auto")) == 1
    assert LATEST_NAME in caplog.text and "not a readable PyTorch checkpoint" in caplog.text


def test_bad_cohort_exits_1_naming_the_file(tmp_path, caplog):
    csv = tmp_path / "train.csv"
    csv.write_text("path,ich,patient_id\nmissing_049.pkl,1,P1\n")
    (tmp_path / "masks").mkdir()
    code = train.main(["--train_csv", str(csv), "--val_csv", str(csv), "--mask_dir", str(tmp_path / "masks"),
                       "--output_dir", str(tmp_path / "out"), "--model", "tiny", "--allow_patient_overlap"])
    assert code == 1
    assert "missing_049.pkl" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Issue 14: nothing lost, nothing silently wrong; one line, never a traceback.
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(small_cohort, tmp_path_factory):
    """A one-epoch run; the tests below only try to start runs on top of it (refused before any write)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(cli_args(small_cohort, out, "--epochs", "1")) == 0
    return out


def error_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]


def test_rerun_without_resume_refuses_to_overwrite_a_finished_run(small_cohort, finished_run, tmp_path, caplog):
    before = {name: (finished_run / name).read_bytes() for name in ("best_model.pth", "metrics.csv")}
    assert train.main(cli_args(small_cohort, finished_run, "--epochs", "1")) == 2
    [line] = error_lines(caplog)
    assert f"--output_dir {finished_run} already holds a training run (latest_model.pth" in line
    assert "--resume auto" in line and "--overwrite" in line
    assert {name: (finished_run / name).read_bytes() for name in before} == before

    # --overwrite replaces it, leaving nothing of the old run behind (no stale epoch snapshot, no old best).
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "checkpoint_epoch_0009.pth").write_bytes(b"old")
    caplog.clear()
    assert train.main(cli_args(small_cohort, copy, "--epochs", "1", "--overwrite")) == 0
    assert "removed the previous run's" in caplog.text and not (copy / "checkpoint_epoch_0009.pth").exists()


@pytest.mark.parametrize("flags, named", [
    (("--target_spacing", "2", "2", "2"), "--target_spacing 3 3 3 (this run: 2 2 2)"),
    (("--hu_window", "-50", "150"), "--hu_window -100 200 (this run: -50 150)"),
    (("--normalization", "minmax"), "--normalization zscore (this run: minmax)"),
    (("--visual_tokens", "128"), "--visual_tokens 256 (this run: 128)"),
    (("--no-mask_refiner",), "--mask_refiner on (this run: off)"),
    (("--model", "sam_med3d_turbo", "--pretrained_checkpoint", "none"), "--model tiny (this run: sam_med3d_turbo)"),
    (("--freeze_encoder", "--pretrained_checkpoint", "BEST"), "--freeze_encoder off (this run: on)"),
])
def test_resume_with_other_settings_is_refused_naming_them(small_cohort, finished_run, caplog, flags, named):
    flags = tuple(str(finished_run / "best_model.pth") if f == "BEST" else f for f in flags)
    assert train.main(cli_args(small_cohort, finished_run, "--epochs", "2", "--resume", "auto", *flags)) == 2
    [line] = error_lines(caplog)
    assert line.startswith(f"--resume {finished_run / LATEST_NAME} was trained with other settings: ")
    assert named in line and "\n" not in line


def test_resume_from_the_encoder_export_is_refused(small_cohort, finished_run, caplog):
    encoder = finished_run / "sam_encoder.pth"
    assert train.main(cli_args(small_cohort, finished_run, "--epochs", "2", "--resume", str(encoder))) == 2
    [line] = error_lines(caplog)
    assert "sam_encoder.pth is the encoder export for BLIP-2" in line and "latest_model.pth" in line


def test_resume_checks_the_optimizer_parameter_groups(tmp_path):
    import guards

    trainer = make_trainer(tmp_path, fixed_batches(1, 1))
    saved = trainer.optimizer.state_dict()
    guards.check_parameter_groups(saved, trainer.optimizer, tmp_path / LATEST_NAME)  # the same groups pass
    saved["param_groups"] = saved["param_groups"][1:]   # e.g. saved with --freeze_encoder: no encoder group
    with pytest.raises(guards.ResumeMismatchError, match=r"parameter groups differ \(checkpoint: decoder \d+ "
                                                         r"tensors, scratch \d+ tensors; this run: encoder"):
        guards.check_parameter_groups(saved, trainer.optimizer, tmp_path / LATEST_NAME)


@pytest.mark.parametrize("case", ["file", "under_file", "read_only", "not_creatable", "cache_is_file"])
def test_unusable_output_or_cache_dir_is_one_line_before_any_work(small_cohort, tmp_path, monkeypatch, caplog,
                                                                 case):
    import guards

    target, extra = tmp_path / "out", ()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    if case == "file":
        target = blocker
    elif case == "under_file":
        target = blocker / "out"
    elif case == "cache_is_file":
        extra = ("--cache_dir", str(blocker))
    elif case == "read_only":
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(guards.tempfile, "TemporaryFile", read_only)
    else:
        def denied(self, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(guards.Path, "mkdir", denied)
    monkeypatch.setattr(train.dataloader, "validate_cohort", lambda *a: pytest.fail("data work before the check"))
    assert train.main(cli_args(small_cohort, target, "--epochs", "1", *extra)) == 2
    [line] = error_lines(caplog)
    flag, path = ("--cache_dir", blocker) if case == "cache_is_file" else ("--output_dir", target)
    assert line.startswith(f"{flag} {path} ")
    assert {"file": "is a file, not a folder", "under_file": f"{blocker} is a file",
            "read_only": "is not writable (Read-only file system)",
            "not_creatable": "cannot be created (Permission denied)",
            "cache_is_file": "is a file, not a folder"}[case] in line



@pytest.mark.parametrize("flag", ["--output_dir", "--cache_dir"])
def test_cross_validation_checks_its_folders_before_any_write(tmp_path, monkeypatch, caplog, flag):
    # run_cross_validation creates --output_dir and its cv.log first: a file there was a FileExistsError traceback.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    (tmp_path / "folds").mkdir()
    target = blocker if flag == "--output_dir" else blocker / "cache"
    folders = {"--output_dir": str(tmp_path / "cv"), "--cache_dir": str(tmp_path / "cache"), flag: str(target)}
    monkeypatch.setattr(train, "run_cross_validation", lambda *a: pytest.fail("cross-validation before the check"))
    assert train.main(["--folds_dir", str(tmp_path / "folds"), "--mask_dir", str(tmp_path), "--model", "tiny",
                       "--device", "cpu", *[x for pair in folders.items() for x in pair]]) == 2
    [line] = error_lines(caplog)
    assert line.startswith(f"{flag} {target} ") and str(blocker) in line and "\n" not in line

def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_says_what_to_free(small_cohort, tmp_path,
                                                                                    monkeypatch, caplog):
    out = tmp_path / "run"
    real_save = torch.save

    def save_until_the_disk_fills(obj, handle, *args, **kwargs):
        # The first save after epoch 2 is latest_model.pth; torch reports the failed write with the OSError as
        # the context of its own RuntimeError.
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            handle.write(b"partial")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    assert train.main(cli_args(small_cohort, out, "--epochs", "2")) == 1
    [line] = error_lines(caplog)
    assert line.startswith(f"disk full while writing {out / LATEST_NAME}: free ") and " on /" in line
    assert "still holds its previous content" in line and "--resume auto" in line
    monkeypatch.setattr(torch, "save", real_save)
    assert final_weights(out)["epoch"] == 1   # epoch 1's checkpoint, intact
    assert not list(out.glob(".*.tmp"))


def test_offline_turbo_weights_end_the_run_before_data_validation(small_cohort, tmp_path, monkeypatch, caplog):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(train.dataloader, "validate_cohort", lambda *a: pytest.fail("data work before the check"))
    args = cli_args(small_cohort, tmp_path / "out", "--model", "sam_med3d_turbo", "--pretrained_checkpoint", "turbo")
    assert train.main(args) == 2
    [line] = error_lines(caplog)
    assert line.startswith("cannot fetch pretrained checkpoint 'turbo'") and "local path" in line


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_saves_and_exits_130(small_cohort, tmp_path, stop):
    # What timeout, systemd, SLURM (SIGTERM) and a terminal's Ctrl-C (SIGINT) do: signal every process of the job,
    # DataLoader workers included.
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"),
               *cli_args(small_cohort, out, "--epochs", "50", "--num_workers", "1")]
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        log = out / "train.log"
        while not (log.exists() and "epoch 1/50" in log.read_text()):   # an epoch done: workers are running
            assert process.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        os.killpg(process.pid, stop)
        output = process.communicate(timeout=240)[0].decode()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "killed by signal" not in output
    log = (out / "train.log").read_text()
    assert log.count(f"received {stop.name}") == 1
    assert final_weights(out)["epoch"] >= 1
