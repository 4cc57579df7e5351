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
    ``tissue_std(window)``: one head-tissue standard deviation in the output's units.
    ``problem(array, window)``: why ``apply`` would refuse this volume, or None; cohort validation asks before any
    model is built, so such a scan is reported with the other problems instead of failing while the cache fills."""

    apply: Callable[[np.ndarray, Window], np.ndarray]
    tissue_std: Callable[[Window], float]
    problem: Callable[[np.ndarray, Window], str | None] = lambda array, window: None


def clip_to_window(array: np.ndarray, window: Window) -> np.ndarray:
    """A float32 copy of ``array`` clipped to [low, high] HU (the caller's array is untouched)."""
    low, high = window
    return np.clip(array.astype(np.float32), low, high)


def _head_problem(array: np.ndarray, window: Window, name: str) -> str | None:
    """Why z-scoring over the voxels above ``window[0]`` (clipped to the window) is impossible: fewer than two such
    voxels, or all of them equal after clipping. One pass over the volume and one over the head: cheap enough for
    validation, which asks for every scan."""
    low, high = window
    inside = array > low
    count = int(np.count_nonzero(inside))
    if count < 2:
        return (f"{name} normalisation needs voxels above {low:g} HU (the head); found {count}. The scan holds no "
                "head tissue in raw HU: check the file (raw HU expected) or --hu_window")
    values = array[inside]
    if min(float(values.max()), high) <= float(values.min()):
        return f"{name} normalisation: the {count} voxels above {low:g} HU are all equal after clipping to {high:g}"
    return None


def _zscore_over_head(array: np.ndarray, window: Window, name: str) -> np.ndarray:
    """Clip to ``window``, then z-score with mean/std of the voxels above its floor (the head, not the air)."""
    problem = _head_problem(array, window, name)
    if problem is not None:
        raise ValueError(problem)
    volume = clip_to_window(array, window)
    values = volume[volume > window[0]]
    mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
    volume -= mean
    volume /= max(std, 1e-6)
    return volume


def _zscore_above_floor(array: np.ndarray, window: Window) -> np.ndarray:
    """Clip, then z-score with mean/std of the voxels above the window floor: the head, not the air around it
    (SAM-Med3D was pretrained on z-scored volumes)."""
    return _zscore_over_head(array, window, "zscore")


# SAM-Med3D's pretraining: CT clamped to [-1000, 1000] HU, then z-scored over the voxels > 0 (torchio
# ZNormalization(masking_method=x > 0)); the run's --hu_window is not used.
SAM_MED3D_CLAMP: Window = (-1000.0, 1000.0)
# Standard deviation of the voxels > 0 HU after that clamp, measured on synthetic heads (344-377 HU: bone dominates),
# to express one head-tissue standard deviation in sam_med3d units for the augmentation magnitudes.
SAM_MED3D_TYPICAL_STD_HU = 360.0


# The voxels sam_med3d z-scores over: above 0 HU, below the clamp's top (the run's --hu_window is not used).
_SAM_MED3D_HEAD: Window = (0.0, SAM_MED3D_CLAMP[1])


def _sam_med3d(array: np.ndarray, window: Window) -> np.ndarray:
    """Clamp to -1000..1000 HU and z-score over the voxels above 0 HU, as SAM-Med3D was pretrained."""
    volume = clip_to_window(array, SAM_MED3D_CLAMP)
    problem = _head_problem(volume, _SAM_MED3D_HEAD, "sam_med3d")
    if problem is not None:
        raise ValueError(problem)
    values = volume[volume > 0]
    mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
    volume -= mean
    volume /= max(std, 1e-6)
    return volume


def _minmax(array: np.ndarray, window: Window) -> np.ndarray:
    """Clip, then map the window linearly onto [0, 1]."""
    low, high = window
    volume = clip_to_window(array, window)
    volume -= low
    volume /= high - low
    return volume


NORMALIZATIONS: dict[str, Normalization] = {
    "zscore": Normalization(apply=_zscore_above_floor, tissue_std=lambda window: 1.0,
                            problem=lambda array, window: _head_problem(array, window, "zscore")),
    "minmax": Normalization(apply=_minmax, tissue_std=lambda window: HEAD_TISSUE_STD_HU / (window[1] - window[0])),
    "none": Normalization(apply=clip_to_window, tissue_std=lambda window: HEAD_TISSUE_STD_HU),
    "sam_med3d": Normalization(apply=_sam_med3d, tissue_std=lambda window: HEAD_TISSUE_STD_HU / SAM_MED3D_TYPICAL_STD_HU,
                               problem=lambda array, window: _head_problem(array, _SAM_MED3D_HEAD, "sam_med3d")),
}


def get_normalization(name: str) -> Normalization:
    """The mode called ``name``; ValueError naming the valid ones otherwise."""
    mode = NORMALIZATIONS.get(name)
    if mode is None:
        raise ValueError(f"unknown normalization {name!r}; expected one of {', '.join(NORMALIZATIONS)}")
    return mode
