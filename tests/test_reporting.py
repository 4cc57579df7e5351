"""Tests for reporting.py: training summaries, time left, the metrics table rewritten from the history, and the
pictures."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import reporting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------- time

@pytest.mark.parametrize("seconds, text", [
    (3723, "1h 02m 03s"), (3600, "1h 00m 00s"), (90061, "25h 01m 01s"), (125, "2m 05s"),
    (59.4, "59s"), (59.6, "1m 00s"), (0, "0s"),
])
def test_format_duration(seconds, text):
    assert reporting.format_duration(seconds) == text


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_format_duration_rejects_impossible(bad):
    with pytest.raises(ValueError):
        reporting.format_duration(bad)


def test_eta_estimator_uses_moving_window():
    eta = reporting.EtaEstimator(window=3)
    assert eta.eta_seconds(10) is None and eta.average_epoch_seconds is None
    eta.update(100.0)  # slow first epoch (cache filling)
    assert eta.eta_seconds(4) == pytest.approx(400.0)
    eta.update(10.0)
    eta.update(10.0)
    assert eta.eta_seconds(3) == pytest.approx(120.0)  # mean(100, 10, 10) = 40
    eta.update(10.0)  # the slow epoch leaves the window
    assert eta.average_epoch_seconds == pytest.approx(10.0)
    assert eta.eta_seconds(5) == pytest.approx(50.0)
    assert eta.eta_seconds(0) == 0.0
    with pytest.raises(ValueError):
        eta.eta_seconds(-1)
    with pytest.raises(ValueError):
        eta.update(float("nan"))
    with pytest.raises(ValueError):
        reporting.EtaEstimator(window=0)


def test_eta_counts_the_validations_still_to_come():
    eta = reporting.EtaEstimator(window=3)
    eta.update(10.0, validation_seconds=30.0)   # validation costs more than training here
    eta.update(10.0)                            # an epoch without validation
    assert eta.average_validation_seconds == pytest.approx(30.0)
    assert eta.eta_seconds(4, remaining_validations=2) == pytest.approx(4 * 10.0 + 2 * 30.0)
    assert eta.eta_seconds(4) == pytest.approx(40.0)
    with pytest.raises(ValueError):
        eta.update(1.0, validation_seconds=-1.0)


# --------------------------------------------------------------------------------------------------- summary JSON

def _strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_write_training_summary_converts_values(tmp_path):
    summary = {
        "best_dice": np.float32(0.75), "epochs": np.int64(12), "loss": float("nan"), "ratio": float("inf"),
        "lr": torch.tensor(1e-4), "curve": torch.tensor([0.5, 0.25]), "shape": (128, 128, 128),
        "output": tmp_path / "x", "flags": {"amp": np.bool_(True), 3: None}, "arr": np.array([1, 2]),
    }
    path = reporting.write_training_summary(tmp_path, summary)
    assert path.parent == tmp_path
    assert re.fullmatch(r"training_summary_\d{8}-\d{6}\.json", path.name)
    data = _strict_json(path)
    assert data["best_dice"] == 0.75 and data["epochs"] == 12
    assert data["loss"] is None and data["ratio"] is None
    assert data["lr"] == pytest.approx(1e-4) and data["curve"] == [0.5, 0.25]
    assert data["shape"] == [128, 128, 128] and data["output"] == str(tmp_path / "x")
    assert data["flags"] == {"amp": True, "3": None} and data["arr"] == [1, 2]

    second = reporting.write_training_summary(tmp_path, {"n": 1})  # same second: must not overwrite
    assert second != path and _strict_json(path)["epochs"] == 12


def test_write_training_summary_names_unconvertible_value(tmp_path):
    with pytest.raises(TypeError, match=r"summary\['model'\].*object"):
        reporting.write_training_summary(tmp_path, {"model": object()})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------- metrics.csv

def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_metrics_csv_is_the_history_with_new_columns_appended(tmp_path):
    path = tmp_path / "metrics.csv"
    history = [{"epoch": 1, "train_loss": 0.9, "lr": 1e-4},
               {"epoch": 2, "train_loss": np.float32(0.5), "lr": 1e-4, "val_dice": 0.25},
               {"epoch": 3, "train_loss": float("nan"), "lr": 5e-5, "memory": torch.tensor(1.5)}]
    reporting.write_metrics_csv(path, history)
    lines = path.read_text().splitlines()
    assert lines[0] == "epoch,train_loss,lr,val_dice,memory"
    assert lines[1] == "1,0.9,0.0001,," and len(lines) == 4
    rows = _read_rows(path)
    assert rows[1]["val_dice"] == "0.25" and float(rows[1]["train_loss"]) == pytest.approx(0.5)
    assert math.isnan(float(rows[2]["train_loss"])) and rows[2]["memory"] == "1.5"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]   # written atomically: no temp file left
    with pytest.raises(ValueError, match="epochs must increase"):
        reporting.write_metrics_csv(path, [{"epoch": 2}, {"epoch": 2}])
    with pytest.raises(ValueError, match="cells must be numbers"):
        reporting.write_metrics_csv(path, [{"epoch": 1, "bad": object()}])


def test_metrics_csv_after_resume_has_each_epoch_once(tmp_path):
    # A run killed after epoch 3 left three rows; the checkpoint it resumes from holds epochs 1-2 (e.g. best or an
    # older latest). The next epoch rewrites the table from the restored history: no stale row 3, no duplicate.
    path = tmp_path / "metrics.csv"
    straight = [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    reporting.write_metrics_csv(path, straight)
    checkpointed = straight[:2]
    resumed = checkpointed + [{"epoch": 3, "train_loss": 0.3, "val_dice": 0.5}]
    reporting.write_metrics_csv(path, resumed)
    rows = _read_rows(path)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[2]["train_loss"] == "0.3" and rows[2]["val_dice"] == "0.5" and rows[0]["val_dice"] == ""


# --------------------------------------------------------------------------------------------------- pictures

def _read_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)


def test_plot_learning_curves_tolerates_gaps(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 1.0, "lr": 1e-4},
        {"epoch": 2, "train_loss": 0.8, "val_loss": 0.9, "val_dice": 0.2, "val_dice_1click": None,
         "lr": 1e-4},
        {"epoch": 3, "train_loss": float("nan"), "lr": 5e-5},
        {"epoch": 4, "train_loss": 0.6, "val_loss": 0.7, "val_dice": 0.4, "val_dice_1click": 0.5,
         "lr": 5e-5},
    ]
    path = tmp_path / "plots" / "learning_curves.png"
    reporting.plot_learning_curves(history, path)
    image = _read_png(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100  # three panels side by side
    reporting.plot_learning_curves([], tmp_path / "empty.png")
    assert _read_png(tmp_path / "empty.png").size > 0


def test_select_overlay_slices_prefers_most_blood():
    label = np.zeros((8, 8, 10), np.float32)
    pred = np.zeros_like(label)
    label[2:6, 2:6, 4] = 1  # 16 voxels
    label[3:5, 3:5, 7] = 1  # 4 voxels
    pred[1:7, 1:7, 2] = 1  # 36 voxels
    # The ground truth decides where blood is shown; the prediction only when there is no ground truth blood.
    assert reporting.select_overlay_slices(label, pred, axis=2, num_slices=2, size=10) == [4, 7]
    assert reporting.select_overlay_slices(np.zeros_like(label), pred, axis=2, num_slices=2, size=10) == [2]
    assert reporting.select_overlay_slices(label, None, axis=2, num_slices=5, size=10) == [4, 7]
    assert reporting.select_overlay_slices(np.zeros_like(label), None, axis=2, num_slices=3, size=10) == [5]
    assert reporting.select_overlay_slices(None, None, axis=0, num_slices=3, size=8) == [4]


def test_save_overlay_png(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(32, 32, 12)).astype(np.float32)
    label = np.zeros_like(image)
    label[10:20, 10:20, 5:8] = 1
    pred = np.zeros_like(image)
    pred[12:22, 11:19, 6:9] = 1
    path = tmp_path / "overlay.png"
    reporting.save_overlay_png(image, label, pred, path, "case 049 - Dice 0.61")
    assert _read_png(path).shape[1] > 200
    reporting.save_overlay_png(torch.from_numpy(image), None, None, tmp_path / "plain.png", "no masks")
    assert _read_png(tmp_path / "plain.png").size > 0
    with pytest.raises(ValueError, match=r"label shape \(32, 32, 11\) does not match"):
        reporting.save_overlay_png(image, label[..., :11], None, tmp_path / "bad.png", "bad")
    with pytest.raises(ValueError, match="3-D"):
        reporting.save_overlay_png(image[None], None, None, tmp_path / "bad.png", "bad")
    assert not (tmp_path / "bad.png").exists()




def test_plot_dice_by_volume(tmp_path):
    rows = [{"volume_true_ml": 12.0, "dice": 0.8, "hd95_mm": 3.0}, {"volume_true_ml": 2.0, "dice": 0.4,
                                                                     "hd95_mm": 9.0},
            {"volume_true_ml": 0.0, "dice": 1.0, "hd95_mm": float("nan")}]
    reporting.plot_dice_by_volume(rows, tmp_path / "dice.png")
    assert (tmp_path / "dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_epoch_line_reads_missing_scores_as_n_a_and_marks_a_new_best():
    record = {"epoch": 3, "train_loss": 0.51234, "lr": 2e-3, "epoch_time_s": 65.0, "data_wait_fraction": 0.04,
              "val_dice": float("nan")}
    plain = reporting.epoch_line(record, 40, 125.0, improved=False)
    assert plain == ("epoch 3/40  loss 0.5123  val Dice n/a (clicks 1/3/5: n/a/n/a/n/a)  lr 2.00e-03  1m 05s "
                     "(data wait 4%)  ETA 2m 05s")
    validated = reporting.epoch_line({**record, "val_dice": 0.71234, "val_dice_1click": 0.75, "val_dice_3click": 0.8,
                                      "val_dice_5click": 0.81}, 40, 0.0, improved=True)
    assert "val Dice 0.7123 (clicks 1/3/5: 0.7500/0.8000/0.8100)" in validated and validated.endswith("(new best)")
