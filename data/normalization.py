"""Intensity normalisation modes: raw HU in, network input out. Adding a mode is one entry in ``NORMALIZATIONS``.

Each mode owns its windowing (most clip to the run's ``--hu_window``; a mode may use a fixed window of its own) and
says how large one head-tissue standard deviation is in its output units, which scales the intensity
augmentations. Only numpy is imported, so ``config`` can offer the names as ``--normalization`` choices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# Standard deviation of head tissue in HU once bone is saturated by the window (brain, blood, CSF): the yardstick of
# the augmentation magnitudes, which are given in z-score units.
HEAD_TISSUE_STD_HU = 60.0

Window = tuple[float, float]


@dataclass(frozen=True)
class Normalization:
    """``apply(array, window)``: D×H×W raw HU (any real dtype, not modified) -> D×H×W float32 network input.
    ``tissue_std(window)``: one head-tissue standard deviation in the output's units."""

    apply: Callable[[np.ndarray, Window], np.ndarray]
    tissue_std: Callable[[Window], float]


def clip_to_window(array: np.ndarray, window: Window) -> np.ndarray:
    """A float32 copy of ``array`` clipped to [low, high] HU (the caller's array is untouched)."""
    low, high = window
    return np.clip(array.astype(np.float32), low, high)


def _zscore_above_floor(array: np.ndarray, window: Window) -> np.ndarray:
    """Clip, then z-score with mean/std of the voxels above the window floor: the head, not the air around it
    (SAM-Med3D was pretrained on z-scored volumes)."""
    low = window[0]
    volume = clip_to_window(array, window)
    inside = volume > low
    count = int(np.count_nonzero(inside))
    if count < 2:
        raise ValueError(f"zscore normalisation needs voxels above the window floor {low:g} HU (the head); "
                         f"found {count}")
    values = volume[inside]
    mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
    if std < 1e-6:
        raise ValueError(f"zscore normalisation: the {count} voxels above {low:g} HU are constant ({mean:g})")
    volume -= mean
    volume /= std
    return volume


# SAM-Med3D's pretraining: CT clamped to [-1000, 1000] HU, then z-scored over the voxels > 0 (torchio
# ZNormalization(masking_method=x > 0)); the run's --hu_window is not used.
SAM_MED3D_CLAMP: Window = (-1000.0, 1000.0)
# Standard deviation of the voxels > 0 HU after that clamp, measured on synthetic heads (344-377 HU: bone dominates),
# to express one head-tissue standard deviation in sam_med3d units for the augmentation magnitudes.
SAM_MED3D_TYPICAL_STD_HU = 360.0


def _sam_med3d(array: np.ndarray, window: Window) -> np.ndarray:
    """Clamp to -1000..1000 HU and z-score over the voxels above 0 HU, as SAM-Med3D was pretrained."""
    volume = clip_to_window(array, SAM_MED3D_CLAMP)
    inside = volume > 0
    count = int(np.count_nonzero(inside))
    if count < 2:
        raise ValueError(f"sam_med3d normalisation needs voxels above 0 HU (the head); found {count}")
    values = volume[inside]
    mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
    if std < 1e-6:
        raise ValueError(f"sam_med3d normalisation: the {count} voxels above 0 HU are constant ({mean:g})")
    volume -= mean
    volume /= std
    return volume


def _minmax(array: np.ndarray, window: Window) -> np.ndarray:
    """Clip, then map the window linearly onto [0, 1]."""
    low, high = window
    volume = clip_to_window(array, window)
    volume -= low
    volume /= high - low
    return volume


NORMALIZATIONS: dict[str, Normalization] = {
    "zscore": Normalization(apply=_zscore_above_floor, tissue_std=lambda window: 1.0),
    "minmax": Normalization(apply=_minmax, tissue_std=lambda window: HEAD_TISSUE_STD_HU / (window[1] - window[0])),
    "none": Normalization(apply=clip_to_window, tissue_std=lambda window: HEAD_TISSUE_STD_HU),
    "sam_med3d": Normalization(apply=_sam_med3d, tissue_std=lambda window: HEAD_TISSUE_STD_HU / SAM_MED3D_TYPICAL_STD_HU),
}


def get_normalization(name: str) -> Normalization:
    """The mode called ``name``; ValueError naming the valid ones otherwise."""
    mode = NORMALIZATIONS.get(name)
    if mode is None:
        raise ValueError(f"unknown normalization {name!r}; expected one of {', '.join(NORMALIZATIONS)}")
    return mode
