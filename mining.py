"""False-positive mining: training crops centred where the model being trained wrongly sees blood.

On a small cohort a beam-hardening streak or a hyperdense rim at the inner table turns up in a few scans; with one
crop per scan per epoch, most of them centred on blood, the model meets each look-alike a handful of times and
paints it as a bleed on validation scans (and on its own training scans: the learning benchmark's eighth cohort,
scan 012, a 26.7 mL band). Trained on four scans, so each got ~250 crops, the same model learnt that streak away.
Centring crops on hyperdense tissue chosen by a rule (``--hard_negative_crop_fraction``) picks mostly tissue the
model already reads right. Here the model itself says
where it is wrong: every few epochs a prompt-free pass over the training scans (the validation pass's sliding
window and component rule) lists the voxels it calls blood that are not within ``LABEL_MARGIN_VOXELS`` of the
label, and a share of the next epochs' crops is centred on them (data.transforms.RandHemorrhageCropd). It is online
hard example mining at the level of crops, as detectors mine hard negative boxes.

Mining runs at the start of an epoch, between optimiser steps; the result is kept in the checkpoint, so a resumed
run crops exactly as an uninterrupted one.

Measured on the learning benchmark's failing runs (bench/results/learning_bench.md, "Crop-level false-positive
mining"): within the CPU recipe's 1,000 steps it makes the model fit some bands of its own training scans, not the
bands of new scans, so it is off by default (``--false_positive_crop_fraction 0``). A pass over 24 scans costs 5-7 s
on 2 CPU cores.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from data.transforms import thin_indices
from distributed import RankGroup
from inference import drop_components, sliding_window_logits

logger = logging.getLogger(__name__)

# Predicted voxels this close to the label (in preprocessed voxels) are the bleed's own margin, not a look-alike.
LABEL_MARGIN_VOXELS = 2
# Mined voxels kept per scan (every k-th in raster order beyond it): the list travels with each sample's key.
MAX_MINED_VOXELS = 4096


@torch.no_grad()
def false_positive_voxels(model: nn.Module, image: torch.Tensor, label: torch.Tensor, roi_size: int,
                          amp_dtype: torch.dtype | None, spacing: Sequence[float], min_component_ml: float = 0.0,
                          min_component_peak: float = 0.5, max_voxels: int = MAX_MINED_VOXELS) -> np.ndarray:
    """Flat indices (int32, raster order, at most ``max_voxels``) of the voxels of the 1×1×D×H×W ``image`` that
    ``model``'s prompt-free answer (components dropped as validation drops them) calls blood more than
    ``LABEL_MARGIN_VOXELS`` away from ``label``'s blood."""
    logits = drop_components(sliding_window_logits(model, image, roi_size, amp_dtype), spacing, min_component_ml,
                             min_component_peak)
    predicted = (logits[0, 0] > 0).cpu().numpy()
    blood = label[0, 0].cpu().numpy() > 0
    if blood.any():
        blood = ndimage.binary_dilation(blood, iterations=LABEL_MARGIN_VOXELS)
    return thin_indices(np.flatnonzero(predicted & ~blood), max_voxels)


class FalsePositiveMining:
    """Mining over ``scans`` (items with ``image`` and ``label`` as 1×D×H×W arrays: the cached training scans, in
    dataset order) every ``every`` epochs (``due``, ``before_epoch``) and its result: dataset index -> voxels.
    ``spacing``, ``min_component_ml`` and ``min_component_peak``: as validation reads the model's answer. Each of
    the ``ranks`` (this one: ``rank``) mines every world_size-th scan; all end with every scan's result."""

    def __init__(self, every: int, scans: Any, roi_size: int, spacing: Sequence[float],
                 ranks: RankGroup | None = None, rank: int = 0, min_component_ml: float = 0.0,
                 min_component_peak: float = 0.5) -> None:
        if every < 1:
            raise ValueError(f"mining interval must be >= 1 epoch, got {every}")
        self.every, self.scans, self.roi_size, self.spacing = every, scans, roi_size, tuple(spacing)
        self.ranks, self.rank = ranks or RankGroup(1, torch.device("cpu")), rank
        self.min_component_ml, self.min_component_peak = min_component_ml, min_component_peak
        self.indices: dict[int, np.ndarray] = {}
        self.mined_at: int | None = None
        self.pass_seconds = 0.0  # how long the last pass took (0 before the first): for the ETA

    def due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) starts with a mining pass: every ``every``-th, not the first (the
        model has not learnt yet what blood is) and not again after a resume within that epoch."""
        return epoch > 0 and epoch % self.every == 0 and self.mined_at != epoch

    def before_epoch(self, epoch: int, model: nn.Module, device: torch.device,
                     amp_dtype: torch.dtype | None = None) -> dict[int, np.ndarray]:
        """The voxels epoch ``epoch``'s crops are centred on: mined now with ``model`` when ``due``, else the last
        ones (none before the first pass)."""
        if self.due(epoch):
            self.mine(epoch, model, device, amp_dtype)
        return self.indices

    def mine(self, epoch: int, model: nn.Module, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> dict[int, np.ndarray]:
        """One prompt-free pass of ``model`` over the scans."""
        started = time.time()
        was_training = model.training
        model.eval()
        found: list[tuple[int, np.ndarray]] = []
        try:
            for index in range(self.rank, len(self.scans), self.ranks.world_size):
                item = self.scans[index]
                image = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)[None].to(device)
                label = torch.as_tensor(np.asarray(item["label"]))[None]
                voxels = false_positive_voxels(model, image, label, self.roi_size, amp_dtype, self.spacing,
                                               self.min_component_ml, self.min_component_peak)
                if voxels.size:
                    found.append((index, voxels))
        finally:
            model.train(was_training)
        self.indices = dict(self.ranks.gather(found))
        self.mined_at = epoch
        self.pass_seconds = time.time() - started
        logger.info("false-positive mining before epoch %d: %d of %d training scans have false positives "
                    "(%d crop centres) [%.1f s]", epoch + 1, len(self.indices), len(self.scans),
                    sum(v.size for v in self.indices.values()), self.pass_seconds)
        return self.indices

    def seconds_left(self, next_epoch: int, epochs: int) -> float:
        """Time the passes still due from ``next_epoch`` to ``epochs`` will take, at the last pass's duration."""
        return self.pass_seconds * sum(self.due(epoch) for epoch in range(next_epoch, epochs))

    def state_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint (loads with ``torch.load(weights_only=True)``)."""
        return {"mined_at": self.mined_at,
                "indices": {int(k): torch.from_numpy(v) for k, v in self.indices.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mined_at = state.get("mined_at")
        self.indices = {int(k): np.ascontiguousarray(torch.as_tensor(v).numpy(), dtype=np.int32)
                        for k, v in state.get("indices", {}).items()}

