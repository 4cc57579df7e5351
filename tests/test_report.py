"""report.py: the numbers of the evaluation report and report.md, from per-scan rows as predict.py writes them."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import metrics
import report


@pytest.fixture(autouse=True)
def _fewer_resamples(monkeypatch):
    """The intervals' logic does not depend on the count; 2,000 resamples only make them smoother (and slower)."""
    monkeypatch.setattr(report, "BOOTSTRAP_RESAMPLES", 400)


def evaluation_rows(n_positive=12, n_negative=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_positive + n_negative):
        true = float(rng.uniform(2, 60)) if i < n_positive else 0.0
        pred = max(0.0, true * float(rng.normal(1.0, 0.15)) + float(rng.normal(0, 1.0)))
        rows.append({"file": f"{i:03d}.pkl", "dice": float(rng.uniform(0.5, 0.9)) if true else float(pred == 0),
                     "hd95_mm": float(rng.uniform(2, 20)) if true and pred else math.nan,
                     "volume_pred_ml": pred, "volume_true_ml": true, "volume_error_ml": pred - true,
                     "dice_1click": float(rng.uniform(0.6, 0.95))})
    return rows


def test_numbers_are_the_shared_summary_with_intervals_around_them():
    rows = evaluation_rows()
    numbers = report.build_report(rows, detection_threshold_ml=0.1, clicks=(1,))
    summary = metrics.summarize(rows, detection_threshold_ml=0.1)
    for key, value in summary.items():
        assert numbers["summary"][key] == pytest.approx(value, nan_ok=True)
    positives = [r for r in rows if r["volume_true_ml"] > 0]
    assert numbers["summary"]["dice_positive_1click"] == pytest.approx(np.mean([r["dice_1click"] for r in positives]))
    for key in ("dice", "dice_positive", "dice_positive_1click", "hd95_mm", "volume_abs_error_ml"):
        low, high = numbers["summary_ci"][key]
        assert low <= numbers["summary"][key] <= high, key
    assert numbers["counts"] == {"all": 18, "ICH+": 12, "ICH-": 6,
                                 "both masks non-empty": sum(math.isfinite(r["hd95_mm"]) for r in rows)}
    agreement = numbers["agreement"]["positive"]
    true = [r["volume_true_ml"] for r in positives]
    pred = [r["volume_pred_ml"] for r in positives]
    assert agreement["icc_2_1"] == pytest.approx(metrics.icc_2_1(pred, true))
    assert agreement["pearson_r"] == pytest.approx(np.corrcoef(true, pred)[0, 1])
    assert agreement["icc_2_1"] > 0.8 and agreement["n"] == 12
    assert numbers == report.build_report(rows, detection_threshold_ml=0.1, clicks=(1,))   # a fixed seed


def test_agreement_of_too_few_scans_is_not_a_number():
    one = evaluation_rows(n_positive=1, n_negative=0)
    agreement = report.volume_agreement(one)
    assert math.isnan(agreement["icc_2_1"]) and math.isnan(agreement["pearson_r"])


def test_report_md_and_json(tmp_path):
    rows = evaluation_rows()
    report.write_report(tmp_path, rows, checkpoints=[Path("cv/fold_0/best_model.pth"),
                                                     Path("cv/fold_1/best_model.pth")],
                        input_path="splits/test.csv", mask_dir="masks", detection_threshold_ml=0.1, threshold=0.5,
                        simulated_clicks=(1,))
    text = (tmp_path / "report.md").read_text()
    assert "ensemble of 2 checkpoints" in text and "`splits/test.csv`" in text
    assert "| Dice | ICH+ | 12 |" in text and "| Dice after 1 simulated click | ICH+ | 12 |" in text
    assert "| detection specificity | ICH- | 6 |" in text and "95% percentile bootstrap" in text
    assert "ICC(2,1)" in text and "| 017.pkl |" in text and "Dice 1 click" in text
    numbers = json.loads((tmp_path / "report.json").read_text())
    assert numbers["bootstrap"] == {"resamples": report.BOOTSTRAP_RESAMPLES, "confidence": 0.95, "seed": 0}
    assert (tmp_path / "dice_by_volume.png").stat().st_size > 1000


def test_numbers_of_the_tables_never_read_minus_zero():
    assert report.format_number(-0.0001) == "0.000" and report.format_number(-0.004, 2) == "0.00"
    assert report.format_number(-0.0006) == "-0.001" and report.format_number(12.3456, 2) == "12.35"
    assert report.format_number(None) == report.format_number(math.nan) == report.format_number(math.inf) == "n/a"
