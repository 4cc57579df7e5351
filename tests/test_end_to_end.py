"""The real CLI on a generated cohort: learning happens, every output is written and loads safely."""
from __future__ import annotations

import json
import sys

import torch

import selftest
import train
from config import Config
from conftest import LEARNING_EPOCHS, LEARNING_VAL_EVERY


def test_cli_training_learns_on_thick_slices_with_small_bleeds_and_writes_every_output(trained_run):
    """The self-test's recipe on a cohort unlike the self-test's (conftest.LEARNING_COHORT: 5 mm slices, 3-12 mL
    bleeds, scans larger than one window, negatives without masks)."""
    out = trained_run["output_dir"]
    for name in selftest.EXPECTED_FILES:
        assert (out / name).is_file(), name
    assert list(out.glob("training_summary_*.json"))
    for name in ("best_model.pth", "latest_model.pth", "sam_encoder.pth"):
        torch.load(out / name, map_location="cpu", weights_only=True)

    latest = torch.load(out / "latest_model.pth", map_location="cpu", weights_only=True)
    history = latest["history"]
    assert len(history) == LEARNING_EPOCHS
    validated = [h for h in history if "val_dice" in h]
    assert [h["epoch"] for h in validated] == list(range(LEARNING_VAL_EVERY, LEARNING_EPOCHS + 1, LEARNING_VAL_EVERY))
    best = max(validated, key=lambda h: h["val_dice"])
    trace = [(h["epoch"], round(h["val_dice"], 3), round(h["val_dice_1click"], 3), h["val_specificity"])
             for h in validated]
    # Measured on this cohort (2 CPU cores) before training crops were placed off-centre: Dice on ICH-positive scans
    # 0.72-0.82 from epoch 10 on, both ICH-negative scans predicted empty at every validation, clicks never worse than
    # prompt-free by more than 0.005. With off-centre crops these assertions still hold (fresh-clone CI).
    assert best["val_dice"] >= 0.6, trace
    assert best["val_specificity"] == 1.0 and best["val_negative_fp_ml"] < 0.1, trace
    assert best["val_dice_1click"] >= best["val_dice"] - 0.02, trace
    assert best["val_dice_5click"] >= best["val_dice_1click"] - 0.02, trace
    assert all("val_dice_all" in h and "val_dice_3click" in h for h in validated)

    saved = json.loads((out / "config.json").read_text())
    assert Config.from_dict(saved) == Config.from_dict(latest["config"])
    best_state = torch.load(out / "best_model.pth", map_location="cpu", weights_only=True)
    assert best_state["best_metric"] == best["val_dice"]


def test_self_test_reports_failure_when_learning_does_not_happen(monkeypatch, capsys):
    # Two epochs stay on the empty-mask plateau: the self-test must say FAIL and exit 1, not pass vacuously.
    monkeypatch.setattr(selftest, "SELFTEST_EPOCHS", 2)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: that check is SKIP, not PASS
    monkeypatch.setattr(selftest, "SELFTEST_COHORT", {**selftest.SELFTEST_COHORT, "n_train": 4, "n_val": 2})
    code = train.main(["--test", "--device", "cpu"])
    report = capsys.readouterr().out
    assert code == 1
    assert "FAIL  learning" in report and "PASS  output files" in report and "PASS  resume" in report
    assert "SKIP  BLIP-2 Q-Former" in report and "transformers not installed" in report
    assert report.rstrip().splitlines()[-1].startswith("FAIL in")
