"""Fine-tuning starts from the weights it is given (the issue: the default run ignored them).

The model of the suite's shared training run (``trained_run``: the tiny build trained on the thick-slice learning
cohort) is fine-tuned for one epoch on a *different* cohort (other shape, spacing and lesion sizes) through the real
CLI pipeline, once from its checkpoint and once from scratch. ``bench/transfer_bench.py`` measures the full story
(weights saved in the published SAM-Med3D layout, refiner and representation head fresh) with more epochs than a
test can afford; its numbers are in bench/results/transfer_bench.md.
"""
from __future__ import annotations

import json

import pytest

import train
from config import build_config
from synthetic import generate_cohort

OTHER_COHORT = {"n_train": 6, "n_val": 4, "shape": (80, 88, 20), "spacing": (2.0, 1.8, 5.0), "seed": 17,
                "min_ml": 4.0, "max_ml": 15.0}
# A fine-tuning recipe: the learning rate of fine-tuning (the decoder then trains at 0.1x, the fresh parts at
# --scratch_lr), one epoch, validated.
FINE_TUNE = ["--model", "tiny", "--device", "cpu", "--batch_size", "2", "--gradient_accumulation_steps", "1",
             "--lr", "2e-4", "--epochs", "1", "--val_every", "1", "--target_spacing", "2", "2", "2",
             "--num_workers", "0", "--seed", "0"]


def _fine_tune(cohort, output_dir, weights: str) -> tuple[dict, str]:
    config, warnings = build_config(["--train_csv", str(cohort.train_csv), "--val_csv", str(cohort.val_csv),
                                     "--mask_dir", str(cohort.mask_dir), "--output_dir", str(output_dir),
                                     "--pretrained_checkpoint", weights, *FINE_TUNE])
    code, summary = train.run_training(config, warnings)
    assert code == 0 and summary is not None
    return summary, (output_dir / "train.log").read_text()


@pytest.mark.slow
def test_fine_tuning_starts_from_the_given_weights_far_ahead_of_scratch(trained_run, tmp_path):
    cohort = generate_cohort(tmp_path / "other", **OTHER_COHORT)
    weights = trained_run["output_dir"] / "best_model.pth"
    assert json.loads((trained_run["output_dir"] / "config.json").read_text())["model"]["name"] == "tiny"

    scratch, scratch_log = _fine_tune(cohort, tmp_path / "scratch", "none")
    pretrained, pretrained_log = _fine_tune(cohort, tmp_path / "pretrained", str(weights))

    assert "tensors from" not in scratch_log
    loaded = next(line for line in pretrained_log.splitlines() if "tensors from" in line)
    assert str(weights) in loaded and "sha256" in loaded
    trace = {"scratch": scratch["best_val_dice"], "pretrained": pretrained["best_val_dice"]}
    assert pretrained["best_val_dice"] >= scratch["best_val_dice"] + 0.3, trace
    assert pretrained["best_val_dice"] >= 0.4, trace
