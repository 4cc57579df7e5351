"""The one deterministic preprocessing pipeline and the settings value it takes.

``Preprocessing`` (window, normalisation, target spacing, input size, pipeline version) is built once from the
run's config (``Preprocessing.from_config``), hashed into every cache key, stored in every checkpoint and in
``sam_encoder.pth``, and read back by ``predict.py`` and the BLIP-2 helper: the plans object that travels with the
model. ``preprocess_image`` is the pipeline, ``resample_to_shape`` its geometry (also used to map predictions back
onto the original grid) and ``pad_with_air`` the single way volumes are padded.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import numpy as np
import torch
from monai.transforms import Resize, ResizeWithPadOrCrop, SpatialPad
from monai.utils import convert_to_dst_type

from config import DataConfig
from data.io import looks_preprocessed, parse_spacing
from data.normalization import get_normalization

logger = logging.getLogger(__name__)

# Bump when preprocess_image or the cached layout changes: it is part of every cache key and of every saved
# Preprocessing, so a model is never fed volumes from another pipeline.
PIPELINE_VERSION = 1

Volume = TypeVar("Volume", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a raw scan into network input, as one frozen value (the only argument the
    preprocessing functions take).

    hu_window: (low, high) HU the normalisation clips to.
    normalization: a key of ``data.normalization.NORMALIZATIONS``.
    target_spacing: mm per voxel after resampling, array axis order.
    input_size: the model's crop side S (S×S×S); sizes crops and the BLIP-2 input, not the cached volume.
    pipeline_version: the ``PIPELINE_VERSION`` that produced volumes with these settings.
    """

    hu_window: tuple[float, float]
    normalization: str
    target_spacing: tuple[float, float, float]
    input_size: int
    pipeline_version: int = PIPELINE_VERSION

    def __post_init__(self) -> None:
        get_normalization(self.normalization)  # ValueError naming the valid modes
        low, high = self.hu_window
        if not low < high:
            raise ValueError(f"hu_window needs low < high, got {tuple(self.hu_window)}")
        if len(self.target_spacing) != 3 or not all(s > 0 for s in self.target_spacing):
            raise ValueError(f"target_spacing must be 3 positive sizes in mm, got {tuple(self.target_spacing)}")
        if self.input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {self.input_size}")

    @classmethod
    def from_config(cls, data_config: DataConfig, input_size: int, pipeline_version: int = PIPELINE_VERSION
                    ) -> Preprocessing:
        """The run's settings for a model of input side ``input_size`` (``model.img_size``)."""
        return cls(hu_window=tuple(float(v) for v in data_config.hu_window),  # type: ignore[arg-type]
                   normalization=data_config.normalization,
                   target_spacing=tuple(float(s) for s in data_config.target_spacing),  # type: ignore[arg-type]
                   input_size=int(input_size), pipeline_version=int(pipeline_version))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, a string) for checkpoints and JSON; ``from_dict`` reads it back."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Preprocessing:
        """Rebuild from ``to_dict`` output. Exports written before the version was stored lack
        ``pipeline_version``: they were made by version 1."""
        unknown = sorted(set(raw) - {"hu_window", "normalization", "target_spacing", "input_size",
                                     "pipeline_version"})
        if unknown:
            raise ValueError(f"unknown preprocessing settings {', '.join(unknown)}")
        return cls(hu_window=tuple(float(v) for v in raw["hu_window"]),  # type: ignore[arg-type]
                   normalization=str(raw["normalization"]),
                   target_spacing=tuple(float(s) for s in raw["target_spacing"]),  # type: ignore[arg-type]
                   input_size=int(raw["input_size"]), pipeline_version=int(raw.get("pipeline_version", 1)))

    def volume_settings(self) -> dict[str, Any]:
        """The settings that shape the preprocessed volume (what a cache key must hash): all but ``input_size``,
        which only sizes the crops taken from it."""
        settings = self.to_dict()
        del settings["input_size"]
        return settings

    def intensity_unit(self) -> float:
        """One head-tissue standard deviation in the normalised units (scales the intensity augmentations)."""
        return get_normalization(self.normalization).tissue_std(self.hu_window)


def preprocessed_shape(shape: Sequence[int], spacing: Sequence[float],
                       target_spacing: Sequence[float]) -> tuple[int, int, int]:
    """Grid size after resampling: round(size × spacing / target_spacing) per axis, at least 1. The physical
    extent is kept, so the realised spacing differs from the target by under half a voxel over the extent."""
    return tuple(max(1, int(math.floor(n * s / t + 0.5))) for n, s, t in  # type: ignore[return-value]
                 zip(shape, spacing, target_spacing))
def resample_to_shape(volume: np.ndarray | torch.Tensor, shape: Sequence[int], mode: str = "linear"
                      ) -> np.ndarray | torch.Tensor:
    """Resample a D×H×W or C×D×H×W volume onto a grid of ``shape`` covering the same physical extent.

    Voxel centres are aligned as in ``align_corners=False`` (the grid spans [0, n·spacing) on every axis), so a
    forward resampling and the reverse one (predict.py mapping a prediction back) describe the same geometry.

    Args:
        volume: numpy array or torch tensor (any device); 3-D or channel-first 4-D.
        shape: the 3 output sizes.
        mode: "linear" (images, probabilities: box-average along shrinking axes, which avoids the aliasing of
            plain trilinear downsampling, then trilinear) or "nearest" (label maps: nearest-exact, dtype kept).
    Returns:
        Same type, rank and device as ``volume``; float32 for "linear", the input dtype for "nearest".
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive sizes, got {shape}")
    if mode not in ("linear", "trilinear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    if volume.ndim not in (3, 4):
        raise ValueError(f"expected a D×H×W or C×D×H×W volume, got shape {tuple(volume.shape)}")
    is_numpy = isinstance(volume, np.ndarray)
    data = torch.from_numpy(np.ascontiguousarray(volume)) if is_numpy else volume
    squeeze = data.ndim == 3
    if squeeze:
        data = data[None]
    in_dtype = data.dtype
    if mode == "nearest":
        out = Resize(shape, mode="nearest-exact", dtype=torch.float32)(data.float())
        out = torch.as_tensor(out).to(in_dtype)
    else:
        out = data.float()
        current = tuple(out.shape[1:])
        if any(t < c for t, c in zip(shape, current)):
            # Box-average only the shrinking axes first; the others keep their size for the trilinear step.
            shrunk = tuple(min(t, c) for t, c in zip(shape, current))
            out = torch.as_tensor(Resize(shrunk, mode="area", dtype=torch.float32)(out))
        if tuple(out.shape[1:]) != shape:
            out = torch.as_tensor(Resize(shape, mode="trilinear", align_corners=False, dtype=torch.float32)(out))
    if squeeze:
        out = out[0]
    return out.cpu().numpy() if is_numpy else out



def preprocess_image(array: np.ndarray, spacing: Sequence[float], preprocessing: Preprocessing,
                     source: str | None = None) -> np.ndarray:
    """Window, normalise and resample one raw CT volume: the single deterministic preprocessing pipeline.

    1. Normalise with ``preprocessing.normalization`` (see ``data.normalization``): "zscore" clips to
       ``hu_window`` (default -100..200 HU keeps brain 20-45, blood 50-90 and CSF 0-15 at full contrast and
       saturates bone, whose 1000+ HU would otherwise dominate the statistics) and z-scores with the mean/std of
       the voxels above the window floor; "minmax" maps the window onto [0, 1]; "none" only clips;
       "sam_med3d" is SAM-Med3D's pretraining input (clamp -1000..1000 HU, z-score over the voxels > 0 HU).
    2. Resample to ``target_spacing`` (default 1.5 mm isotropic, SAM-Med3D's training spacing) with
       ``resample_to_shape(..., "linear")``.

    Args:
        array: D×H×W raw volume in HU (any real dtype; not modified).
        spacing: its voxel spacing in mm, array axis order.
        source: optional file name; when given, a volume that does not look like raw HU is logged as a warning.
    Returns:
        1×D'×H'×W' float32, D'×H'×W' = preprocessed_shape(array.shape, spacing, target_spacing).
    """
    if preprocessing.pipeline_version != PIPELINE_VERSION:
        raise ValueError(f"these settings are for preprocessing pipeline version {preprocessing.pipeline_version}; "
                         f"this code implements version {PIPELINE_VERSION}: use the ichseg release that trained "
                         "the model")
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"preprocess_image expects a D×H×W volume, got shape {tuple(array.shape)}")
    spacing = parse_spacing(spacing, Path(source or "<array>"), "spacing")
    if source is not None:
        reason = looks_preprocessed(array)
        if reason is not None:
            logger.warning("%s: %s; expected raw HU", source, reason)
    volume = get_normalization(preprocessing.normalization).apply(array, preprocessing.hu_window)
    target = preprocessed_shape(volume.shape, spacing, preprocessing.target_spacing)
    return np.ascontiguousarray(resample_to_shape(volume, target, "linear")[None], dtype=np.float32)


def pad_with_air(volume: Volume, size: int | Sequence[int], *, method: str = "symmetric", fill: float | None = None,
                 center_crop: bool = False) -> Volume:
    """Pad a C×D×H×W volume to at least ``size`` on every spatial axis, with air rather than zeros.

    After windowing, a volume's minimum is its air, whereas 0 is average tissue in a z-scored volume: padding
    with the minimum makes the border look like the air around a head, as in every training crop.

    Args:
        volume: numpy array or torch tensor (any device).
        size: the spatial size to reach (one int for all three axes).
        method: "symmetric" (split the padding evenly, the extra voxel after) or "end".
        fill: the padding value; None means ``volume.min()``. A label passes 0.
        center_crop: also centre-crop axes longer than ``size`` (MONAI ``ResizeWithPadOrCrop``), giving exactly
            ``size``.
    Returns:
        The same type, dtype and device as ``volume`` (no MONAI metadata).
    """
    value = float(volume.min()) if fill is None else float(fill)
    spatial = (size,) * 3 if isinstance(size, int) else tuple(size)
    if center_crop:
        padder = ResizeWithPadOrCrop(spatial, method=method, mode="constant", value=value)
    else:
        padder = SpatialPad(spatial, method=method, mode="constant", value=value)
    return convert_to_dst_type(padder(volume), volume)[0]
