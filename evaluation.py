"""Validation of a model on whole preprocessed volumes: prompt-free, then after 1, 3 and 5 simulated clicks.

Sliding-window inference (MONAI) per scan, the same metrics as ``predict.py --mask_dir`` (``metrics.py``), per-scan
rows gathered over the ranks. The headline Dice is the mean over ICH-positive scans (see ``headline_dice``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

import metrics
from distributed import RankGroup
from inference import SIMULATED_CLICKS, drop_components, simulated_click_logits, sliding_window_logits
from objective import SegmentationLoss

# Called once per validation with the first ICH-positive scan: (batch, image, label, prediction).
OnPositive = Callable[[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor], None]


def headline_dice(summary: dict[str, float]) -> float:
    """Mean Dice over ICH-positive scans, or over all scans when the set has no positive scan.

    With the 1-or-0 convention on empty scans, an all-empty model scores the negative-scan fraction on all scans
    and was picked as "best" on small cohorts; negatives are judged by specificity and false-positive volume."""
    return summary["dice"] if math.isnan(summary["dice_positive"]) else summary["dice_positive"]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict[str, Any]], device: torch.device, roi_size: int,
             amp_dtype: torch.dtype | None, loss_fn: SegmentationLoss, spacing: tuple[float, float, float],
             ranks: RankGroup, progress: bool = True, on_first_positive: OnPositive | None = None,
             min_component_ml: float = 0.0, min_component_peak: float = 0.5) -> dict[str, Any]:
    """``val_*`` statistics of ``model`` (in eval mode) on every scan of ``loader``: loss, Dice prompt-free
    (positives: ``val_dice``; all scans: ``val_dice_all``), Dice after 1/3/5 clicks, HD95, volume error (mL),
    false-positive mL on negatives, detection sensitivity/specificity. The prompt-free answer drops components
    under ``min_component_ml`` or without a voxel of probability ``min_component_peak`` (as ``predict.py`` does)
    before the loss, the metrics and the clicks see it."""
    rows: list[dict[str, Any]] = []
    click_rows: dict[int, list[dict[str, Any]]] = {k: [] for k in SIMULATED_CLICKS}
    for batch in tqdm(loader, desc="validation", disable=None if progress else True, leave=False):
        image = batch["image"].to(device)
        label = batch["label"].to(device)
        logits = drop_components(sliding_window_logits(model, image, roi_size, amp_dtype), spacing,
                                 min_component_ml, min_component_peak)
        loss, _ = loss_fn([logits], None, label)
        prediction = logits > 0
        case_id = str(batch.get("case_id", [len(rows)])[0])
        rows.append({"case_id": case_id, "loss": float(loss),
                     **metrics.segmentation_metrics(prediction.cpu(), label.cpu(), spacing)})
        for clicks, refined in simulated_click_logits(model, image, label, logits, roi_size, amp_dtype).items():
            click_rows[clicks].append({"case_id": case_id,
                                       **metrics.segmentation_metrics((refined > 0).cpu(), label.cpu(), spacing)})
        if on_first_positive is not None and bool(label.any()):
            on_first_positive(batch, image, label, prediction)
            on_first_positive = None
    rows = ranks.gather_cases(rows)
    summary = metrics.summarize(rows)
    result = {"val_loss": float(sum(r["loss"] for r in rows) / len(rows)) if rows else math.nan,
              "val_dice": headline_dice(summary), "val_dice_all": summary["dice"]}
    for clicks in SIMULATED_CLICKS:
        result[f"val_dice_{clicks}click"] = headline_dice(metrics.summarize(ranks.gather_cases(click_rows[clicks])))
    result.update({"val_hd95_mm": summary["hd95_mm"], "val_volume_abs_error_ml": summary["volume_abs_error_ml"],
                   "val_negative_fp_ml": summary["negative_fp_ml"], "val_sensitivity": summary["sensitivity"],
                   "val_specificity": summary["specificity"]})
    return result
