"""The evaluation report ``predict.py --mask_dir`` writes: ``report.md`` and ``report.json`` next to metrics.csv.

Numbers meant for a paper, on a held-out test set (``splits.py``'s ``test.csv``): the cohort means with 95%
percentile-bootstrap confidence intervals (scans resampled with replacement, ``BOOTSTRAP_RESAMPLES`` times with a
fixed seed, so the report is reproducible; ``metrics.bootstrap_ci`` over the same ``metrics.summarize`` that
training validation uses), hematoma-volume agreement over all scans and over ICH-positive scans (Bland–Altman bias
and 95% limits of agreement, ICC(2,1), Pearson r, each with its bootstrap interval) and every scan's metrics. The
pictures are drawn by ``reporting``: ``volume_agreement.png`` (scatter and Bland–Altman) and ``dice_by_volume.png``.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import metrics
import reporting
import utils
from reporting import format_number  # noqa: F401  (re-exported: crossval and the benches format with it)

logger = logging.getLogger("ichseg.report")

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
Rows = Sequence[Mapping[str, Any]]


def cohort_summary(rows: Rows, detection_threshold_ml: float, clicks: Sequence[int] = ()) -> dict[str, float]:
    """``metrics.summarize`` plus the mean Dice over ICH-positive scans after each of ``clicks`` simulated clicks
    (rows carry ``dice_<k>click``)."""
    summary = metrics.summarize(rows, detection_threshold_ml=detection_threshold_ml)
    positives = [r for r in rows if r["volume_true_ml"] > 0]
    for k in clicks:
        summary[f"dice_positive_{k}click"] = (float(np.mean([r[f"dice_{k}click"] for r in positives]))
                                              if positives else math.nan)
    return summary


def volume_agreement(rows: Rows) -> dict[str, float]:
    """Predicted vs true hematoma volume: n, Bland–Altman bias and limits of agreement (mL), ICC(2,1), Pearson r
    (NaN where undefined: fewer than two scans, or a constant volume)."""
    true = np.array([r["volume_true_ml"] for r in rows], dtype=float)
    pred = np.array([r["volume_pred_ml"] for r in rows], dtype=float)
    varied = len(rows) >= 2 and true.std() > 0 and pred.std() > 0
    return {"n": float(len(rows)), **metrics.bland_altman(true, pred),
            "icc_2_1": metrics.icc_2_1(pred, true) if len(rows) >= 2 else math.nan,
            # np.corrcoef rather than scipy.stats.pearsonr: only r is reported, and inside the bootstrap
            # pearsonr's p-value machinery cost ~40x more (measured 18 s of 28 s for one report).
            "pearson_r": float(np.corrcoef(true, pred)[0, 1]) if varied else math.nan}


def _ci(rows: Rows, statistic: Any) -> dict[str, tuple[float, float]]:
    return metrics.bootstrap_ci(rows, statistic, resamples=BOOTSTRAP_RESAMPLES, confidence=CONFIDENCE,
                                seed=BOOTSTRAP_SEED)


def _metric_lines(clicks: Sequence[int]) -> list[tuple[str, str, str]]:
    """(summary key, label, which scans count) in the order of the report."""
    lines = [("dice", "Dice", "all"), ("dice_positive", "Dice", "ICH+")]
    lines += [(f"dice_positive_{k}click", f"Dice after {k} simulated click{'s' if k > 1 else ''}", "ICH+")
              for k in clicks]
    return lines + [("hd95_mm", "HD95 (mm)", "both masks non-empty"),
                    ("volume_abs_error_ml", "absolute volume error (mL)", "all"),
                    ("negative_fp_ml", "false-positive volume (mL)", "ICH-"),
                    ("sensitivity", "detection sensitivity", "ICH+"),
                    ("specificity", "detection specificity", "ICH-")]


def _interval(bounds: tuple[float, float], digits: int = 3) -> str:
    if not all(math.isfinite(b) for b in bounds):
        return "n/a"
    return f"{format_number(bounds[0], digits)} – {format_number(bounds[1], digits)}"


def build_report(rows: Rows, detection_threshold_ml: float, clicks: Sequence[int] = ()) -> dict[str, Any]:
    """Every number of the report: {summary, summary_ci, agreement: {all, positive}, agreement_ci, counts}."""
    summary = cohort_summary(rows, detection_threshold_ml, clicks)
    positives = [r for r in rows if r["volume_true_ml"] > 0]
    agreement, agreement_ci = {}, {}
    for name, subset in (("all", rows), ("positive", positives)):
        agreement[name] = volume_agreement(subset)
        agreement_ci[name] = _ci(subset, volume_agreement) if subset else {}
    return {"summary": summary, "summary_ci": _ci(rows, lambda s: cohort_summary(s, detection_threshold_ml, clicks)),
            "agreement": agreement, "agreement_ci": agreement_ci,
            "counts": {"all": len(rows), "ICH+": len(positives), "ICH-": len(rows) - len(positives),
                       "both masks non-empty": sum(math.isfinite(r["hd95_mm"]) for r in rows)}}


def format_markdown(numbers: Mapping[str, Any], rows: Rows, *, checkpoints: Sequence[Path], input_path: str,
                    mask_dir: str | None, detection_threshold_ml: float, threshold: float,
                    clicks: Sequence[int]) -> str:
    counts, summary, ci = numbers["counts"], numbers["summary"], numbers["summary_ci"]
    model = (f"ensemble of {len(checkpoints)} checkpoints (mean probability): " if len(checkpoints) > 1 else "") + \
        ", ".join(f"`{c}`" for c in checkpoints)
    lines = ["# Evaluation report", "", "| | |", "|---|---|", f"| model | {model} |",
             f"| scans | {counts['all']} ({counts['ICH+']} ICH-positive, {counts['ICH-']} ICH-negative) from "
             f"`{input_path}`; masks `{mask_dir}` |",
             f"| decision | voxel probability ≥ {threshold:g}; ICH detected when the predicted volume exceeds "
             f"{detection_threshold_ml:g} mL |",
             f"| confidence intervals | {CONFIDENCE:.0%} percentile bootstrap over scans ({BOOTSTRAP_RESAMPLES} "
             f"resamples, seed {BOOTSTRAP_SEED}) |", "",
             "## Segmentation and detection", "", f"| metric | scans | n | mean | {CONFIDENCE:.0%} CI |",
             "|---|---|---|---|---|"]
    for key, label, scans in _metric_lines(clicks):
        lines.append(f"| {label} | {scans} | {counts[scans]} | {format_number(summary[key])} | "
                     f"{_interval(ci.get(key, (math.nan, math.nan)))} |")
    lines += ["", "Dice on a scan with an empty ground truth is 1 when the prediction is empty too, else 0; HD95 is "
              "defined only where both masks are non-empty.", "", "## Hematoma volume agreement", "",
              "| scans | n | bias (mL) [CI] | 95% limits of agreement (mL) | ICC(2,1) [CI] | Pearson r [CI] |",
              "|---|---|---|---|---|---|"]
    for name, title in (("all", "all"), ("positive", "ICH+")):
        a, a_ci = numbers["agreement"][name], numbers["agreement_ci"][name]
        nan2 = (math.nan, math.nan)
        lines.append(f"| {title} | {int(a['n'])} | {format_number(a['bias'], 2)} "
                     f"[{_interval(a_ci.get('bias', nan2), 2)}] | "
                     f"{format_number(a['loa_low'], 2)} to {format_number(a['loa_high'], 2)} | "
                     f"{format_number(a['icc_2_1'])} [{_interval(a_ci.get('icc_2_1', nan2))}] | "
                     f"{format_number(a['pearson_r'])} [{_interval(a_ci.get('pearson_r', nan2))}] |")
    lines += ["", "![Volume agreement](volume_agreement.png)", "", "![Dice and HD95 by volume](dice_by_volume.png)",
              "", "## Per-scan metrics", ""]
    columns = {"volume_true_ml": "true mL", "volume_pred_ml": "predicted mL", "volume_error_ml": "error mL",
               "dice": "Dice", "hd95_mm": "HD95 mm", **{f"dice_{k}click": f"Dice {k} click" for k in clicks}}
    lines += ["| file | " + " | ".join(columns.values()) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        lines.append("| " + " | ".join([str(row["file"]), *(format_number(row.get(c)) for c in columns)]) + " |")
    return "\n".join(lines) + "\n"


def write_report(output_dir: str | os.PathLike, rows: Rows, *, checkpoints: Sequence[Path], input_path: str,
                 mask_dir: str | None, detection_threshold_ml: float, threshold: float,
                 simulated_clicks: Sequence[int] = ()) -> dict[str, Any]:
    """Write report.md, report.json and dice_by_volume.png (volume_agreement.png is predict.py's); returns the
    numbers. ``rows``: predict.py's per-scan evaluation rows (``metrics.segmentation_metrics`` + file)."""
    output_dir = Path(output_dir)
    numbers = build_report(rows, detection_threshold_ml, simulated_clicks)
    reporting.plot_dice_by_volume(rows, output_dir / "dice_by_volume.png")
    text = format_markdown(numbers, rows, checkpoints=checkpoints, input_path=input_path, mask_dir=mask_dir,
                           detection_threshold_ml=detection_threshold_ml, threshold=threshold,
                           clicks=simulated_clicks)
    utils.atomic_write_text(output_dir / "report.md", text)
    payload = {"checkpoints": [str(c) for c in checkpoints], "input": input_path, "mask_dir": mask_dir,
               "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "confidence": CONFIDENCE, "seed": BOOTSTRAP_SEED},
               **numbers}
    utils.atomic_write_text(output_dir / "report.json", json.dumps(reporting.to_jsonable(payload), indent=2) + "\n")
    logger.info("wrote %s (cohort means with %.0f%% bootstrap confidence intervals, volume agreement)",
                output_dir / "report.md", 100 * CONFIDENCE)
    return numbers
