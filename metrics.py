"""Segmentation and detection metrics shared by validation (trainer.py) and evaluation (predict.py).

Conventions, used everywhere in the project:
- Dice on a scan whose ground truth is empty is 1.0 when the prediction is empty too, else 0.0 (MONAI's
  ``ignore_empty=False``), so false positives on ICH-negative scans lower the mean.
- HD95 (mm) is defined only when both prediction and ground truth are non-empty; otherwise it is NaN and left
  out of means.
- Volumes are in mL: voxel count × voxel volume (mm³) / 1000.
- A scan counts as "ICH predicted" when its predicted volume exceeds ``detection_threshold_ml``.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

DEFAULT_DETECTION_THRESHOLD_ML = 0.1


def _as_mask(volume: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Any 3-D (or 1×1×D×H×W) binary volume as a float 1×1×D×H×W tensor of 0/1."""
    tensor = torch.as_tensor(volume)
    if tensor.ndim == 3:
        tensor = tensor[None, None]
    if tensor.ndim != 5 or tensor.shape[:2] != (1, 1):
        raise ValueError(f"expected a D×H×W or 1×1×D×H×W mask, got shape {tuple(tensor.shape)}")
    return (tensor > 0).float()


def volume_ml(mask: torch.Tensor | np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of the non-zero voxels of ``mask`` in millilitres."""
    voxels = float(torch.count_nonzero(torch.as_tensor(mask)).item())
    return voxels * float(np.prod(spacing)) / 1000.0


def dice(prediction: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray) -> float:
    """Dice of two binary volumes (empty-truth convention in the module docstring)."""
    pred, gt = _as_mask(prediction), _as_mask(truth)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != ground truth shape {tuple(gt.shape)}")
    return float(compute_dice(pred, gt, include_background=True, ignore_empty=False).item())


def hd95_mm(prediction: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray,
            spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm; NaN when either volume is empty."""
    pred, gt = _as_mask(prediction), _as_mask(truth)
    if not pred.any() or not gt.any():
        return math.nan
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about one of its own internal arguments on every call; nothing for users to act on.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        distance = compute_hausdorff_distance(pred, gt, include_background=True, percentile=95,
                                              spacing=[float(s) for s in spacing])
    return float(distance.item())


def segmentation_metrics(prediction: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray,
                         spacing: Sequence[float]) -> dict[str, float]:
    """Per-scan metrics: dice, hd95_mm, volume_pred_ml, volume_true_ml, volume_error_ml (pred − true)."""
    pred_ml = volume_ml(prediction, spacing)
    true_ml = volume_ml(truth, spacing)
    return {
        "dice": dice(prediction, truth),
        "hd95_mm": hd95_mm(prediction, truth, spacing),
        "volume_pred_ml": pred_ml,
        "volume_true_ml": true_ml,
        "volume_error_ml": pred_ml - true_ml,
    }


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarize(rows: Sequence[dict[str, float]],
              detection_threshold_ml: float = DEFAULT_DETECTION_THRESHOLD_ML) -> dict[str, float]:
    """Cohort summary of per-scan rows from ``segmentation_metrics``.

    Returns mean Dice over all scans and over ICH-positive scans, mean HD95, mean absolute volume error, the mean
    predicted volume on ICH-negative scans (false-positive mL) and scan-level detection sensitivity/specificity
    (NaN where a group is empty).
    """
    positives = [r for r in rows if r["volume_true_ml"] > 0]
    negatives = [r for r in rows if r["volume_true_ml"] == 0]
    detected = [r["volume_pred_ml"] > detection_threshold_ml for r in positives]
    cleared = [r["volume_pred_ml"] <= detection_threshold_ml for r in negatives]
    return {
        "scans": float(len(rows)),
        "dice": _nanmean(r["dice"] for r in rows),
        "dice_positive": _nanmean(r["dice"] for r in positives),
        "hd95_mm": _nanmean(r["hd95_mm"] for r in rows),
        "volume_abs_error_ml": _nanmean(abs(r["volume_error_ml"]) for r in rows),
        "negative_fp_ml": _nanmean(r["volume_pred_ml"] for r in negatives),
        "sensitivity": float(np.mean(detected)) if detected else math.nan,
        "specificity": float(np.mean(cleared)) if cleared else math.nan,
    }


# ---------------------------------------------------------------------------------------------------------------
# Cohort statistics for a report: confidence intervals and volume agreement
# ---------------------------------------------------------------------------------------------------------------

def bootstrap_ci(rows: Sequence[dict[str, float]], statistic: Callable[[Sequence[dict[str, float]]], dict[str, float]],
                 resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of every value ``statistic(rows)`` returns (e.g. ``summarize``).

    Scans are resampled with replacement ``resamples`` times; a resample where a value is undefined (NaN, e.g. no
    positive scan drawn for sensitivity) is left out of that value's interval. Deterministic for a ``seed``.
    Returns {key: (low, high)}, NaN bounds where no resample defined the value.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not rows:
        raise ValueError("bootstrap_ci needs at least one row")
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        sample = [rows[i] for i in rng.integers(0, len(rows), size=len(rows))]
        for key, value in statistic(sample).items():
            draws.setdefault(key, []).append(value)
    tail = 100.0 * (1.0 - confidence) / 2.0
    intervals = {}
    for key, values in draws.items():
        finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
        intervals[key] = ((float(np.percentile(finite, tail)), float(np.percentile(finite, 100.0 - tail)))
                          if finite.size else (math.nan, math.nan))
    return intervals


def icc_2_1(*measurements: Sequence[float]) -> float:
    """ICC(2,1) of two or more measurements of the same subjects (Shrout & Fleiss 1979: two-way random effects,
    absolute agreement, single measurement), e.g. predicted and true hematoma volume; NaN for fewer than two
    subjects."""
    if len(measurements) < 2:
        raise ValueError(f"ICC needs at least two measurements per subject, got {len(measurements)}")
    ratings = np.column_stack([np.asarray(m, dtype=float) for m in measurements])
    n, k = ratings.shape
    if n < 2:
        return math.nan
    grand = ratings.mean()
    between_subjects = k * np.sum((ratings.mean(axis=1) - grand) ** 2) / (n - 1)
    between_raters = n * np.sum((ratings.mean(axis=0) - grand) ** 2) / (k - 1)
    residual = (np.sum((ratings - grand) ** 2) - between_subjects * (n - 1) - between_raters * (k - 1)) / (
        (n - 1) * (k - 1))
    denominator = between_subjects + (k - 1) * residual + k * (between_raters - residual) / n
    return float((between_subjects - residual) / denominator) if denominator > 0 else math.nan


def bland_altman(true: Sequence[float], predicted: Sequence[float]) -> dict[str, float]:
    """Bias (mean of predicted − true) and 95% limits of agreement (bias ± 1.96 sample SD; SD 0 for one pair)."""
    difference = np.asarray(predicted, dtype=float) - np.asarray(true, dtype=float)
    if difference.size == 0:
        return {"bias": math.nan, "loa_low": math.nan, "loa_high": math.nan}
    bias = float(difference.mean())
    spread = float(difference.std(ddof=1)) if difference.size > 1 else 0.0
    return {"bias": bias, "loa_low": bias - 1.96 * spread, "loa_high": bias + 1.96 * spread}
