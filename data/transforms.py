"""The MONAI pipeline, defined once; validation uses the deterministic part.

    Case item ──LoadPreprocessd (disk cache)──► image 1×D×H×W float32, label 1×D×H×W uint8, slice axis
                                                                                     (val stops here)
              ──CropIndicesd──► + hemorrhage / head / hyperdense-tissue voxel indices and the air value
                                                                                     (train; cached in RAM)
              ──RandHemorrhageCropd → rotation about the slice axis → PadToRoid → flips / small affine /
                intensity jitter──► S×S×S crops   (with --lesion_paste_prob, after the pad: a bleed of the
                                                   cohort pasted in; with --streak_augmentation_prob, then: bands)

Everything before the first random transform runs once per scan and is kept in the RAM cache, so no crop scans
the whole volume for candidate centres: the indices were computed there.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from scipy import ndimage
from monai.transforms import (
    Compose,
    EnsureTyped,
    FgBgToIndices,
    MapTransform,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandomizableTransform,
    Rotate,
    SelectItemsd,
    ToDeviced,
    Transform,
)

from data.artefacts import RandStreakArtefactd
from data.geometry import MaskOrientation, orient_mask
from data.io import load_image_file, load_mask_file, slice_axis
from data.lesion_paste import TISSUE_MEDIAN_KEY, LesionBank, RandLesionPasted
from data.preprocess import Preprocessing, pad_with_air, preprocess_image, resample_to_shape
from data.records import Case
from utils import atomic_write_bytes

logger = logging.getLogger(__name__)

BATCH_KEYS = ("image", "label", "ich", "case_id")
# Keys CropIndicesd adds for the crop: flat voxel indices of hemorrhage (fg) and of head tissue without hemorrhage
# (bg), int32, and the scan's air value (its minimum after windowing), which pads crops of small volumes.
FG_INDICES_KEY, BG_INDICES_KEY, AIR_KEY = "label_fg_indices", "label_bg_indices", "air"
# Flat indices of hyperdense head tissue that is not hemorrhage (hard negatives: streaks, hyperdense brain), int32,
# and whether the scan has any hemorrhage (an ICH-negative scan's crops all come from its head).
HARD_INDICES_KEY, HAS_BLOOD_KEY = "label_hard_bg_indices", "has_hemorrhage"
# The current model's false-positive voxels in this scan (flat indices), mined during training (see mining.py)
# and handed to the crop with each sample's key; absent before the first mining pass.
MINED_INDICES_KEY = "label_mined_fp_indices"
# The scan's slice axis (largest raw spacing), which in-plane rotations turn about; LoadPreprocessd adds it.
SLICE_AXIS_KEY = "slice_axis"
# Hyperdense = the 3-voxel mean at least this many head-tissue standard deviations (Preprocessing.intensity_unit,
# ~70 HU in the brain window) above the head's median: +14 HU. A beam-hardening streak that a tiny model called a
# 21 mL bleed on a CT-ICH-like negative was +19 HU (47 against 28 HU brain); blood is +35-60 HU.
HYPERDENSE_MARGIN = 0.2
# Bone is tissue this far above the median (> ~135 HU in the brain window); hard negatives keep this many voxels
# away from it, so they are not the partial-volume rim at the inner table that every head has.
BONE_MARGIN, BONE_CLEARANCE_VOXELS = 1.5, 3
# Head voxels are those above the air minimum by this fraction of the intensity range (tissue, not air).
HEAD_MARGIN = 1e-3
# Head-voxel indices kept per scan in the RAM cache: a synthetic 512×512×30 head CT at 1.5 mm (154×154×100, 11.3 MiB
# cached) has ~0.7 M head voxels, 2.7 MiB as int32 (24 % more); every k-th one in raster order (k = ceil(count /
# cap)) caps them at 1 MiB (8 %) while candidate centres stay within a few voxels of any head voxel, far below a
# 128-voxel crop.
MAX_HEAD_INDICES = 2**18
# Augmentation magnitudes in z-score units (1 ≈ one head-tissue standard deviation, about 50-70 HU once bone is
# saturated); Preprocessing.intensity_unit converts them for the other normalisations.
_ROTATE_RAD = math.radians(10.0)
DEFAULT_SCALE_RANGE = 0.1
_INTENSITY_SCALE = 0.1
_INTENSITY_SHIFT = 0.1
_NOISE_STD = 0.05
# Training crops put their chosen voxel anywhere within ±roi/4 of the window centre (a crop of roi + roi/2, then a
# random roi sub-crop): the ViT's learned position embeddings otherwise tie hemorrhage to the window centre, while
# sliding-window inference shows bleeds at every position of a window. Measured: predicted volumes 10-40 % short
# on every positive scan of the repro cohort without it (README "What to expect").
CENTRE_JITTER_FRACTION = 0.25


def cache_key(case: Case, preprocessing: Preprocessing) -> str:
    """Key of a case's preprocessed volume: content hash of its image and mask files, the spacing actually used
    (so a change of the fallback spacing reaches the scans that use it), the mask transpose and every setting that
    shapes the volume (``Preprocessing.volume_settings``: window, normalisation, target spacing, pipeline version).
    Any change gives a new key, so a stale entry is never reused."""
    if case.fingerprint is None or case.spacing is None:
        raise ValueError(f"case {case.case_id} ({case.image_path}) has no fingerprint/spacing: build cases with "
                         "validate_cohort, which reads every file once and fills them in")
    recipe = {
        "content": case.fingerprint,
        "spacing": [float(s) for s in case.spacing],
        "mask_axes": list(case.mask_axes),
        **preprocessing.volume_settings(),
    }
    if any(case.mask_flips):  # only when flipped, so the keys of every unflipped entry cached before stay valid
        recipe["mask_flips"] = list(case.mask_flips)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:40]


class LoadPreprocessd(Transform):
    """Case item -> {image: 1×D×H×W float32 (preprocessed), label: 1×D×H×W uint8, ich, case_id}.

    Deterministic. Looks the item's ``cache_key`` up in ``cache_dir`` first (``<key>.npz``, read with
    ``allow_pickle=False``, so a tampered cache cannot run code either); on a miss it reads the raw files, runs
    ``preprocess_image`` (label: nearest-exact onto the same grid) and writes the entry atomically. Safe to call
    from several threads or processes at once. (Hand-written rather than MONAI's PersistentDataset, whose entries
    are pickles: an npz opens with allow_pickle=False, and entries are named by content and settings, so runs that
    share a cache_dir share them.)
    """

    def __init__(self, preprocessing: Preprocessing, cache_dir: str | os.PathLike):
        self.preprocessing = preprocessing
        self.cache_dir = Path(cache_dir)

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        entry = self.cache_dir / f"{item['cache_key']}.npz"
        arrays = self._read_entry(entry) if entry.exists() else None
        if arrays is None:
            arrays = self._preprocess(item)
            self._write_entry(entry, *arrays)
        image, label = arrays
        return {"image": image, "label": label, "ich": item["ich"], "case_id": item["case_id"],
                SLICE_AXIS_KEY: slice_axis(item["spacing"])}

    def _read_entry(self, entry: Path) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            with np.load(entry, allow_pickle=False) as archive:
                image, label = archive["image"], archive["label"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            logger.warning("cache entry %s is unreadable (%s); preprocessing the scan again", entry, exc)
            return None
        if image.ndim != 4 or image.shape != label.shape or image.dtype != np.float32 or label.dtype != np.uint8:
            logger.warning("cache entry %s holds image %s %s / label %s %s; preprocessing the scan again",
                           entry, image.shape, image.dtype, label.shape, label.dtype)
            return None
        return image, label

    def _preprocess(self, item: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        volume, _ = load_image_file(item["image_path"])
        image = preprocess_image(volume, item["spacing"], self.preprocessing)
        if item["mask_path"]:
            orientation = MaskOrientation(tuple(item["mask_axes"]), tuple(item["mask_flips"]))
            mask = orient_mask(load_mask_file(item["mask_path"]), orientation)
            if mask.shape != volume.shape:
                raise ValueError(f"{item['mask_path']}: mask shape {mask.shape} (after {orientation.describe()}) "
                                 f"differs from image shape {volume.shape}; the files changed after validate_cohort")
            label = resample_to_shape(mask[None], image.shape[1:], "nearest")
        else:  # ICH-negative scan without a mask file: an empty mask
            label = np.zeros(image.shape, dtype=np.uint8)
        return image, np.ascontiguousarray(label, dtype=np.uint8)

    def _write_entry(self, entry: Path, image: np.ndarray, label: np.ndarray) -> None:
        # The project's atomic write (unique temporary file, fsync, rename): concurrent writers of the same entry
        # cannot corrupt it and a crash leaves no half-written file under the final name.
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, image=image, label=label)
        atomic_write_bytes(entry, buffer.getvalue())


def thin_indices(indices: np.ndarray, limit: int) -> np.ndarray:
    """``indices`` as contiguous int32, thinned to every k-th (raster order) when there are more than ``limit``, so
    what is kept still spans the whole region."""
    if indices.size > limit:
        indices = indices[::math.ceil(indices.size / limit)]
    return np.ascontiguousarray(indices, dtype=np.int32)


class CropIndicesd(MapTransform):
    """Deterministic, so it runs once per scan in the RAM-cached stage: adds the flat voxel indices (int32) the crop
    draws its centres from, computed with MONAI ``FgBgToIndices``.

    ``label_fg_indices``: hemorrhage voxels. ``label_bg_indices``: head voxels without hemorrhage (image above its
    air minimum, so negative crops show tissue rather than air); more than ``max_head_indices`` are thinned to every
    k-th in raster order (see ``MAX_HEAD_INDICES``). A scan without hemorrhage gets its head voxels as both, so
    every crop of an ICH-negative scan is head-centred. ``label_hard_bg_indices`` (only with ``hard_negatives``):
    head voxels without hemorrhage whose 3-voxel mean is hyperdense (``HYPERDENSE_MARGIN``) yet clear of bone
    (``BONE_CLEARANCE_VOXELS``), thinned the same way; possibly empty. ``has_hemorrhage``: whether the label has
    any. ``air``: the image minimum, which pads crops. ``tissue_median``: the median of the head voxels (hard
    negatives and pasted lesions are measured from it). ``intensity_unit``: one head-tissue standard deviation in
    the image's units.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label",
                 max_head_indices: int = MAX_HEAD_INDICES, intensity_unit: float = 1.0, hard_negatives: bool = False):
        super().__init__([image_key, label_key])
        self.image_key, self.label_key = image_key, label_key
        self.max_head_indices, self.intensity_unit = max_head_indices, intensity_unit
        self.hard_negatives = hard_negatives

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        image, label = np.asarray(d[self.image_key]), np.asarray(d[self.label_key])
        if label[0].size >= 2**31:
            raise ValueError(f"{d.get('case_id')}: {label[0].size} voxels do not fit int32 crop indices")
        low, high = float(image.min()), float(image.max())
        # The threshold is per scan (the air value depends on the normalisation), hence the array transform here.
        head_mask = image[0] > low + HEAD_MARGIN * (high - low)
        median = float(np.median(image[0][head_mask])) if head_mask.any() else float(np.median(image))
        blood, head = FgBgToIndices()(label, head_mask[None])
        if head.size == 0:  # no head found (cannot happen after validation): any voxel
            head = np.arange(label[0].size)
        d[BG_INDICES_KEY] = self._thin(head)
        d[FG_INDICES_KEY] = np.ascontiguousarray(blood, dtype=np.int32) if blood.size else d[BG_INDICES_KEY]
        if self.hard_negatives:  # a median, a dilation and a filter per scan: only for runs that draw from them
            d[HARD_INDICES_KEY] = self._thin(self._hyperdense(image[0], head_mask, label[0] > 0, median))
        d[HAS_BLOOD_KEY] = bool(blood.size)
        d[AIR_KEY] = low
        d[TISSUE_MEDIAN_KEY] = median
        return d

    def _hyperdense(self, image: np.ndarray, head: np.ndarray, blood: np.ndarray, median: float) -> np.ndarray:
        """Flat indices of head voxels outside ``blood`` whose 3-voxel mean is hyperdense (above the head's
        ``median``) and clear of bone."""
        if not head.any():
            return np.zeros(0, dtype=np.int64)
        bone = ndimage.binary_dilation(image > median + BONE_MARGIN * self.intensity_unit,
                                       iterations=BONE_CLEARANCE_VOXELS)
        smoothed = ndimage.uniform_filter(image.astype(np.float32, copy=False), size=3)
        hard = head & ~blood & ~bone & (smoothed > median + HYPERDENSE_MARGIN * self.intensity_unit)
        return np.flatnonzero(hard)

    def _thin(self, indices: np.ndarray) -> np.ndarray:
        return thin_indices(indices, self.max_head_indices)


class RandHemorrhageCropd(RandCropByPosNegLabeld):
    """One roi³ crop per sample (a dict, not MONAI's list of one): with probability ``pos_fraction`` centred on a
    hemorrhage voxel, otherwise on a head voxel (the indices from CropIndicesd). With ``hard_negative_fraction``
    of those head crops (every crop of an ICH-negative scan is one) centred on hyperdense non-hemorrhage tissue
    instead, where the scan has any. Centres are moved inwards so the crop stays inside the volume; an axis shorter
    than roi is taken whole (PadToRoid then pads it with air). ``build_transforms`` asks for roi + 2·jitter and then
    takes a random roi sub-crop of it.

    With ``mined_fraction``, that share of a scan's crops is centred on one of the voxels the model being trained
    wrongly calls blood (``label_mined_fp_indices``, see mining.py) instead, whatever the scan's label, where the
    scan has any."""

    def __init__(self, roi_size: int, pos_fraction: float, keys: tuple[str, ...] = ("image", "label"),
                 hard_negative_fraction: float = 0.0, mined_fraction: float = 0.0):
        for name, value in (("pos_fraction", pos_fraction), ("hard_negative_fraction", hard_negative_fraction),
                            ("mined_fraction", mined_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        super().__init__(list(keys), label_key="label", spatial_size=(roi_size,) * 3, pos=pos_fraction,
                         neg=1.0 - pos_fraction, num_samples=1, fg_indices_key=FG_INDICES_KEY,
                         bg_indices_key=BG_INDICES_KEY, allow_smaller=True)
        self.hard_negative_fraction, self.mined_fraction = hard_negative_fraction, mined_fraction

    def __call__(self, data: Mapping[str, Any], lazy: bool | None = None) -> dict[str, Any]:  # type: ignore[override]
        # Each draw only when asked for, so a run without mining or hard negatives keeps its random stream (and
        # its crops).
        mined = data.get(MINED_INDICES_KEY)
        if self.mined_fraction > 0 and mined is not None and len(mined) and self.R.rand() < self.mined_fraction:
            data = {**data, FG_INDICES_KEY: mined, BG_INDICES_KEY: mined}
        elif self.hard_negative_fraction > 0 and self.R.rand() < self.hard_negative_fraction:
            hard = data.get(HARD_INDICES_KEY)
            if hard is not None and len(hard):
                data = {**data, BG_INDICES_KEY: hard}
                if not data.get(HAS_BLOOD_KEY, True):
                    data[FG_INDICES_KEY] = hard
        (sample,) = super().__call__(data, lazy)
        for key in self.keys:
            sample[key] = sample[key].clone()  # own memory: nothing downstream can touch the cached volume
        return sample


class RandSliceRotated(RandomizableTransform, MapTransform):
    """With probability ``prob``, rotate image (bilinear, edge values beyond the crop) and label (nearest, 0 beyond)
    about the scan's slice axis (``slice_axis``, default the last) by an angle uniform in ±``max_degrees``.

    A bleed along the skull looks the same at every position around it, so a crescent seen once on the left
    teaches the right and the front too; nnU-Net rotates anisotropic (thick-slice) data ±180° in-plane for the same
    reason. Applied to the crop before its final sub-crop, so the corners the rotation brings in are mostly real.
    """

    def __init__(self, prob: float, max_degrees: float, image_key: str = "image", label_key: str = "label"):
        MapTransform.__init__(self, [image_key, label_key])
        RandomizableTransform.__init__(self, prob)
        self.max_radians = math.radians(max_degrees)
        self.image_key, self.label_key = image_key, label_key
        self._angle = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._angle = float(self.R.uniform(-self.max_radians, self.max_radians))

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        if self.max_radians <= 0:
            return d
        self.randomize()
        if not self._do_transform:
            return d
        angles = [0.0, 0.0, 0.0]
        angles[int(d.get(SLICE_AXIS_KEY, 2))] = self._angle
        d[self.image_key] = Rotate(angles, keep_size=True, mode="bilinear", padding_mode="border")(d[self.image_key])
        d[self.label_key] = Rotate(angles, keep_size=True, mode="nearest", padding_mode="zeros")(d[self.label_key])
        return d


class PadToRoid(MapTransform):
    """Pad image and label symmetrically to at least roi_size on every axis (deterministic): the image with the
    scan's air value (``air`` from CropIndicesd, else its own minimum), so padding looks like the air around a head
    rather than the mean-tissue zero of a z-scored volume; the label with 0."""

    def __init__(self, roi_size: int, image_key: str = "image", label_key: str = "label"):
        super().__init__([image_key, label_key])
        self.roi_size, self.image_key, self.label_key = roi_size, image_key, label_key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        d[self.image_key] = pad_with_air(d[self.image_key], self.roi_size, fill=d.get(AIR_KEY))
        d[self.label_key] = pad_with_air(d[self.label_key], self.roi_size, fill=0)
        return d


@dataclass(frozen=True)
class Transforms:
    """The pipeline, defined once: ``val_cached`` (load + preprocess), ``train_cached`` (the same plus the crop
    indices; both deterministic and cached), ``train_random`` (crop, pad, augmentation; reseeded per sample) and
    ``finalize`` (tensors + the batch keys), shared by train and val."""

    val_cached: Compose
    train_cached: Compose
    train_random: Compose
    finalize: Compose
    lesion_bank: LesionBank | None = None  # with lesion pasting: empty until the loader fills it from the cache


def build_transforms(preprocessing: Preprocessing, cache_dir: str | os.PathLike, positive_crop_fraction: float,
                     augmentation_prob: float, augment_device: torch.device | None = None,
                     hard_negative_crop_fraction: float = 0.0, in_plane_rotation_deg: float = 0.0,
                     scale_augmentation: float = DEFAULT_SCALE_RANGE, lesion_paste_prob: float = 0.0,
                     mined_crop_fraction: float = 0.0, lesion_paste_into_negatives: float = 1.0,
                     streak_augmentation_prob: float = 0.0, lesion_paste_at_bone: float = 0.0) -> Transforms:
    """Train: train_cached → train_random → finalize; val: val_cached → finalize. Crops are
    ``preprocessing.input_size`` on a side.

    ``hard_negative_crop_fraction`` of the head-centred crops are centred on hyperdense non-hemorrhage tissue
    (see CropIndicesd); ``mined_crop_fraction`` of the crops of a scan with mined false positives are centred on
    one of them (see RandHemorrhageCropd). The crop's chosen voxel (hemorrhage, head or mined) lands anywhere
    within ±roi/4 of its centre (``CENTRE_JITTER_FRACTION``). Augmentations each fire with ``augmentation_prob``: a rotation about the slice
    axis within ±``in_plane_rotation_deg`` (on the jittered crop, before its sub-crop), a mirror per axis, a small
    affine (±10° per axis, each axis scaled by 1 ± ``scale_augmentation``; image bilinear with border padding,
    label nearest), intensity scale ±10 %, shift ±0.1 and Gaussian noise σ 0.05 head-tissue standard deviations
    (``Preprocessing.intensity_unit``). With ``lesion_paste_prob`` > 0, that fraction of crops first gets one of
    the training set's bleeds pasted at a random head-tissue position (data.lesion_paste; the bank in
    ``Transforms.lesion_bank`` is filled by the loader from the cached training scans); a crop of an
    ICH-negative scan keeps its drawn paste with probability ``lesion_paste_into_negatives``, and a bleed that lay
    against bone goes against the crop's bone with probability ``lesion_paste_at_bone``. Then
    ``streak_augmentation_prob`` of the crops get beam-hardening-like bands (data.artefacts), the label unchanged.

    With ``augment_device`` the crop (a cheap slice of the cached volume) is moved there before augmentation, so on
    a GPU the affine resampling — the costly step, ~0.5 s per 128³ crop on a CPU core — runs on the GPU."""
    roi_size, prob, unit = preprocessing.input_size, augmentation_prob, preprocessing.intensity_unit()
    keys = ["image", "label"]
    load = LoadPreprocessd(preprocessing, cache_dir)
    to_device = [ToDeviced(keys, device=augment_device)] if augment_device is not None else []
    jitter = int(roi_size * CENTRE_JITTER_FRACTION)
    # Only when asked for: a random transform more in the Compose would reseed every later one.
    rotate = [RandSliceRotated(prob, in_plane_rotation_deg)] if in_plane_rotation_deg > 0 else []
    bank = LesionBank(intensity_unit=unit) if lesion_paste_prob > 0 else None
    paste = ([RandLesionPasted(bank, lesion_paste_prob, intensity_unit=unit, slice_axis_key=SLICE_AXIS_KEY,
                               into_negatives=lesion_paste_into_negatives, at_bone=lesion_paste_at_bone)]
             if bank is not None else [])
    streaks = ([RandStreakArtefactd(streak_augmentation_prob, intensity_unit=unit, slice_axis_key=SLICE_AXIS_KEY)]
               if streak_augmentation_prob > 0 else [])
    train_random = Compose([
        RandHemorrhageCropd(roi_size + 2 * jitter, positive_crop_fraction,
                            hard_negative_fraction=hard_negative_crop_fraction, mined_fraction=mined_crop_fraction),
        *to_device,
        *rotate,
        RandSpatialCropd(keys, roi_size=(roi_size,) * 3, random_size=False),
        PadToRoid(roi_size),
        *paste,
        *streaks,
        # No canonical orientation is known (array order is the file's), so every axis may be mirrored.
        RandFlipd(keys, prob=prob, spatial_axis=0),
        RandFlipd(keys, prob=prob, spatial_axis=1),
        RandFlipd(keys, prob=prob, spatial_axis=2),
        RandAffined(keys, prob=prob, rotate_range=(_ROTATE_RAD,) * 3, scale_range=(scale_augmentation,) * 3,
                    mode=("bilinear", "nearest"), padding_mode=("border", "zeros"),
                    spatial_size=(roi_size,) * 3, cache_grid=True),
        RandScaleIntensityd("image", factors=_INTENSITY_SCALE, prob=prob),
        RandShiftIntensityd("image", offsets=_INTENSITY_SHIFT * unit, prob=prob),
        RandGaussianNoised("image", prob=prob, std=_NOISE_STD * unit),
    ])
    finalize = Compose([
        EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False),
        EnsureTyped("ich", data_type="tensor", dtype=torch.float32, track_meta=False),
        SelectItemsd(list(BATCH_KEYS)),
    ])
    return Transforms(val_cached=Compose([load]), train_cached=Compose([load, CropIndicesd(
                          intensity_unit=unit, hard_negatives=hard_negative_crop_fraction > 0)]),
                      train_random=train_random, finalize=finalize, lesion_bank=bank)
