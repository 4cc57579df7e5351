"""Cohort validation, safe volume loading, preprocessing, caching and DataLoaders for ICH segmentation.

Data flow (every axis is in stored array order, spacing tuples too)::

    train/val CSV ──validate_cohort──► Cohort(train, val, warnings)    every file read once; all problems at once
    Case ──LoadPreprocessd (disk + RAM cache)──► image 1×D×H×W float32, label 1×D×H×W uint8 at target spacing
         ├─ train: pad to roi → RandHemorrhageCropd → flips / small affine / intensity jitter → S×S×S crops
         └─ val:   the whole preprocessed volume

``preprocess_image`` and ``resample_to_shape`` are the one deterministic intensity/geometry pipeline; predict.py
reuses them for new scans and to map predictions back onto the original grid.

Randomness of the training loader depends only on (seed, epoch): the sampler tags each index with the epoch and
every sample's random transforms are reseeded from (seed, epoch, index). Call ``set_epoch(train_loader, epoch)``
before iterating an epoch (as with DistributedSampler); a resumed run then sees exactly the crops of an
uninterrupted one, whatever the number of workers.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import psutil
import torch
from monai.data import CacheDataset, ThreadDataLoader
from monai.data import Dataset as MonaiDataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resize,
    SelectItemsd,
    SpatialCrop,
    SpatialPad,
    ToDeviced,
    Transform,
)
from monai.transforms.utils import correct_crop_centers
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from config import DataConfig
from utils import atomic_write_bytes, usable_cpu_count

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".pkl", ".pickle", ".npy", ".npz", ".nii")
MASK_SUFFIXES = (".nii.gz", ".nii")
ARRAY_KEYS = ("image", "img", "ct", "volume", "data")  # where a pkl/npz dict may keep the volume
REQUIRED_COLUMNS = ("path", "ich", "patient_id")
NORMALIZATIONS = ("zscore", "minmax", "none")
BATCH_KEYS = ("image", "label", "ich", "case_id")
# Bump when preprocess_image or the cached layout changes: it is part of every cache key.
PIPELINE_VERSION = 1
# Raw head CT always contains air (about -1000 HU); a volume without any voxel below this is not raw HU.
AIR_THRESHOLD_HU = -500.0
# HU histogram kept per scan for the dataset statistics: 1-HU bins, every 4th voxel (percentiles need no more).
_HIST_LOW, _HIST_HIGH, _HIST_STRIDE = -1024, 3072, 4
_MAX_LISTED = 50
_BAD_DTYPE_KINDS = {"b": "boolean", "c": "complex", "O": "Python object", "U": "string", "S": "bytes",
                    "V": "structured", "M": "datetime", "m": "timedelta"}
# Augmentation magnitudes, in the units of a z-scored volume (1 ≈ one standard deviation of head tissue, about
# 50-70 HU once bone is saturated by the window); _intensity_unit converts them for the other normalisations.
_ROTATE_RAD = math.radians(10.0)
_SCALE_RANGE = 0.1
_INTENSITY_SCALE = 0.1
_INTENSITY_SHIFT = 0.1
_NOISE_STD = 0.05
_HEAD_TISSUE_STD_HU = 60.0


# ----------------------------------------------------------------------------------------------------------------
# Errors and the cohort records
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """One validation finding: the file, the CSV row it came from (1-based, header not counted) and what is wrong."""

    file: str
    message: str
    csv: str | None = None
    row: int | None = None

    def __str__(self) -> str:
        where = f"{Path(self.csv).name} row {self.row}: " if self.csv is not None and self.row is not None else ""
        return f"{where}{self.file}: {self.message}"


class DataValidationError(ValueError):
    """The cohort cannot be used; ``problems`` lists every problem found (file, row, problem)."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"the cohort has {len(self.problems)} problem(s); fix them before training:\n{lines}")


class VolumeLoadError(ValueError):
    """A single image or mask file cannot be used; the message starts with the file's path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class UnsafePickleError(VolumeLoadError):
    """A pickle referenced something other than numpy arrays and plain containers; nothing from it was run."""


@dataclass(frozen=True)
class Case:
    """One scan of the cohort.

    The first seven fields are the shared contract; the rest are filled by ``validate_cohort`` from what it read,
    so that loading never has to re-derive them: ``spacing`` (mm, image axis order) and where it came from
    (``"image"`` = pkl dict / image header, ``"mask_header"``, ``"fallback"`` = DataConfig.spacing),
    ``mask_axes`` (transpose applied to the mask so that its shape matches the image) and ``fingerprint``
    (content hash of the image and mask bytes, part of the cache key).
    """

    image_path: str
    mask_path: str | None
    ich: int
    patient_id: str
    case_id: str
    csv_path: str
    row: int
    spacing: tuple[float, float, float] | None = None
    spacing_source: str | None = None
    mask_axes: tuple[int, int, int] = (0, 1, 2)
    fingerprint: str | None = None


@dataclass(frozen=True)
class Cohort:
    """Validated train and val cases in CSV order, the warnings found, and per-case facts gathered while reading
    (``case_stats[case_id]``: shape, spacing, HU histogram, blood volume, ...) so statistics need no second read."""

    train: list[Case]
    val: list[Case]
    warnings: list[str]
    case_stats: dict[str, dict[str, Any]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Safe volume loading
# ----------------------------------------------------------------------------------------------------------------

def _latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles use to store byte strings (array buffers)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not accepted; "
                                     "only latin1 byte strings are")
    return text.encode("latin1")


def _pickle_allowlist() -> dict[tuple[str, str], Any]:
    """The only globals a volume pickle may reference, under their numpy 1.x (numpy.core) and 2.x (numpy._core)
    module names. The callables are taken from numpy's own reduce output, so both spellings map to the running
    numpy's functions; each of them only builds arrays, dtypes or scalars from data."""
    reconstruct = np.empty(0).__reduce__()[0]       # numpy.*core.multiarray._reconstruct (protocols 0-4)
    scalar = np.float64(0.0).__reduce__()[0]         # numpy.*core.multiarray.scalar (numpy scalars)
    frombuffer = np.empty(1).__reduce_ex__(5)[0]     # numpy.*core.numeric._frombuffer (protocol 5)
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _VolumeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals. Every way a pickle can call code (REDUCE, INST, OBJ,
    NEWOBJ) first looks the callable up through ``find_class``, so refusing here means nothing else can run."""

    def __init__(self, file: io.BytesIO, source: str):
        super().__init__(file)
        self._source = source
        self._allowed = _pickle_allowlist()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                self._source,
                f"refused to unpickle: the file references {module}.{name}, but only numpy arrays, dtypes, numpy "
                "scalars and plain containers (dict, list, tuple, str, numbers) are accepted; nothing in it was run")
        return obj


def _unpickle(raw: bytes, path: Path) -> Any:
    try:
        return _VolumeUnpickler(io.BytesIO(raw), str(path)).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, UnicodeDecodeError) as exc:
        raise VolumeLoadError(path, f"not a readable pickle ({type(exc).__name__}: {exc})") from exc


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise VolumeLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise VolumeLoadError(path, "is a folder, expected a volume file") from None
    except OSError as exc:
        raise VolumeLoadError(path, f"cannot read the file ({exc.strerror or exc})") from exc


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:32]  # sha256: hardware-accelerated on current CPUs, releases the GIL


def _matching_suffix(name: str, suffixes: Sequence[str]) -> str | None:
    lower = name.lower()
    return next((s for s in suffixes if lower.endswith(s)), None)


def case_id_from_path(path: str | os.PathLike) -> str:
    """The file's name without its volume suffix: ``/data/ct/049.pkl`` and ``049.nii.gz`` -> ``"049"``."""
    name = Path(path).name
    suffix = _matching_suffix(name, IMAGE_SUFFIXES)
    return name[: -len(suffix)] if suffix else Path(name).stem


def _mask_key(stem: str) -> str:
    """Masks are matched by file number; leading zeros do not count (049 == 49), other names must match exactly."""
    return str(int(stem)) if re.fullmatch(r"[0-9]+", stem) else stem


def _nifti_from_bytes(raw: bytes, path: Path) -> nib.Nifti1Image:
    if path.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise VolumeLoadError(path, f"not a valid gzip file ({exc})") from exc
    if len(raw) < 348:
        raise VolumeLoadError(path, f"only {len(raw)} bytes: too short for a NIfTI header (348 bytes)")
    classes = {348: nib.Nifti1Image, 540: nib.Nifti2Image}
    image_class = classes.get(int.from_bytes(raw[:4], "little")) or classes.get(int.from_bytes(raw[:4], "big"))
    if image_class is None:
        raise VolumeLoadError(path, "not a NIfTI-1/NIfTI-2 file (its header-size field is neither 348 nor 540)")
    try:
        return image_class.from_bytes(raw)
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, ValueError, EOFError) as exc:
        raise VolumeLoadError(path, f"unreadable NIfTI header ({exc})") from exc


def _nifti_data(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    try:
        return np.asanyarray(image.dataobj)  # applies scl_slope/scl_inter when the header sets them
    except (ValueError, EOFError, OSError) as exc:
        raise VolumeLoadError(path, f"NIfTI voxel data unreadable or truncated ({exc})") from exc


def _nifti_spacing(image: nib.Nifti1Image) -> tuple[float, float, float] | None:
    """Voxel size from the header, or None when the header carries no geometry: neither qform nor sform set and
    pixdim all 1 is what a bare ``Nifti1Image(array, None)`` writes, not a measured 1 mm."""
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    if len(zooms) < 3 or not all(math.isfinite(z) and z > 0 for z in zooms):
        return None
    codes = (int(image.header["sform_code"]), int(image.header["qform_code"]))
    if codes == (0, 0) and zooms == (1.0, 1.0, 1.0):
        return None
    return zooms  # type: ignore[return-value]


def _array_from_payload(payload: Any, path: Path, what: str) -> tuple[Any, dict[str, Any]]:
    """An array, or a dict holding one under a common key plus optional ``spacing`` / ``affine``."""
    if isinstance(payload, np.ndarray):
        return payload, {}
    if isinstance(payload, Mapping):
        by_lower = {key.lower(): key for key in payload if isinstance(key, str)}
        keys = [by_lower[k] for k in ARRAY_KEYS if k in by_lower]
        if not keys:
            found = ", ".join(repr(k) for k in list(payload)[:10]) or "none"
            raise VolumeLoadError(path, f"the {what} is a dict without an image: expected the volume under one of "
                                        f"the keys {', '.join(ARRAY_KEYS)}; keys found: {found}")
        if len(keys) > 1:
            raise VolumeLoadError(path, f"the {what} has several image keys ({', '.join(map(repr, keys))}); "
                                        "keep exactly one so the volume is unambiguous")
        array = payload[keys[0]]
        if not isinstance(array, np.ndarray):
            raise VolumeLoadError(path, f"the {what}'s {keys[0]!r} holds a {type(array).__name__}, "
                                        "expected a numpy array")
        meta = {name: payload[by_lower[name]] for name in ("spacing", "affine") if name in by_lower}
        return array, meta
    raise VolumeLoadError(path, f"the {what} holds a {type(payload).__name__}; expected a numpy array or a dict "
                                f"with the array under one of the keys {', '.join(ARRAY_KEYS)}")


def _parse_spacing(value: Any, path: Path, what: str) -> tuple[float, float, float]:
    try:
        values = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise VolumeLoadError(path, f"{what} must be 3 numbers in mm, got {value!r}") from None
    if values.size != 3 or not np.isfinite(values).all() or (values <= 0).any():
        raise VolumeLoadError(path, f"{what} must be 3 positive finite numbers in mm (array axis order), "
                                    f"got {values.tolist()}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _geometry(meta: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """{spacing: (mm, mm, mm) | None, affine: 4×4 float64 | None}; ``spacing`` wins over the affine's voxel size."""
    affine = None
    if meta.get("affine") is not None:
        try:
            affine = np.asarray(meta["affine"], dtype=np.float64)
        except (TypeError, ValueError):
            raise VolumeLoadError(path, f"'affine' must be a 4×4 matrix of numbers, got {meta['affine']!r}") from None
        if affine.shape not in ((4, 4), (3, 4)) or not np.isfinite(affine).all():
            raise VolumeLoadError(path, f"'affine' must be a finite 4×4 matrix, got shape {affine.shape}")
        if affine.shape == (3, 4):
            affine = np.vstack([affine, [0.0, 0.0, 0.0, 1.0]])
    spacing = None
    if meta.get("spacing") is not None:
        spacing = _parse_spacing(meta["spacing"], path, "'spacing'")
    elif affine is not None:
        spacing = _parse_spacing(np.linalg.norm(affine[:3, :3], axis=0), path, "the voxel size of 'affine'")
    return {"spacing": spacing, "affine": affine}


def _decode_image(raw: bytes, path: Path) -> tuple[Any, dict[str, Any]]:
    suffix = _matching_suffix(path.name, IMAGE_SUFFIXES)
    if suffix is None:
        raise VolumeLoadError(path, f"unsupported file type; expected one of {', '.join(IMAGE_SUFFIXES)}")
    if suffix in (".pkl", ".pickle"):
        return _array_from_payload(_unpickle(raw, path), path, "pickle")
    if suffix == ".npy":
        try:
            return np.load(io.BytesIO(raw), allow_pickle=False), {}
        except (ValueError, OSError, EOFError) as exc:
            raise VolumeLoadError(path, f"not a readable .npy array ({exc})") from exc
    if suffix == ".npz":
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
                payload = {key: archive[key] for key in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise VolumeLoadError(path, f"not a readable .npz archive ({exc})") from exc
        if len(payload) == 1:
            return next(iter(payload.values())), {}
        return _array_from_payload(payload, path, ".npz archive")
    image = _nifti_from_bytes(raw, path)
    spacing = _nifti_spacing(image)
    return _nifti_data(image, path), {"spacing": spacing, "affine": image.affine if spacing else None}


def _as_volume(array: Any, path: Path) -> np.ndarray:
    """Check that ``array`` is a usable 3-D CT volume and return it as a writable float32 D×H×W array."""
    if not isinstance(array, np.ndarray):
        raise VolumeLoadError(path, f"expected a numpy array, got {type(array).__name__}")
    kind = array.dtype.kind
    if kind not in "iuf":
        raise VolumeLoadError(path, f"image dtype {array.dtype} ({_BAD_DTYPE_KINDS.get(kind, kind)}) cannot be a CT "
                                    "volume; expected integer or floating-point HU values")
    if array.ndim != 3:
        hint = " (a single slice? a 3-D volume is needed)" if array.ndim == 2 else ""
        raise VolumeLoadError(path, f"expected a 3-D volume, got a {array.ndim}-D array of shape "
                                    f"{tuple(array.shape)}{hint}")
    if array.size == 0:
        raise VolumeLoadError(path, f"empty volume of shape {tuple(array.shape)}")
    volume = np.ascontiguousarray(array, dtype=np.float32)
    if not volume.flags.writeable:  # arrays rebuilt from a pickle buffer are read-only views
        volume = volume.copy()
    if kind == "f":
        finite = np.isfinite(volume)  # also catches float64 values beyond the float32 range
        if not finite.all():
            bad = volume.size - int(np.count_nonzero(finite))
            raise VolumeLoadError(path, f"{bad} non-finite voxel(s) (NaN or ±inf) out of {volume.size}; "
                                        "expected finite HU values everywhere")
    low, high = float(volume.min()), float(volume.max())
    if low == high:
        raise VolumeLoadError(path, f"constant volume: every voxel is {low:g}, so there is no image")
    return volume


def _read_image(path: Path, digest: bool = False) -> tuple[np.ndarray, dict[str, Any], str | None]:
    """(volume, geometry, content hash of the file bytes if ``digest``) from a single read of the file."""
    raw = _read_bytes(path)
    array, meta = _decode_image(raw, path)
    volume = _as_volume(array, path)
    return volume, _geometry(meta, path), _digest(raw) if digest else None


def load_image_file(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one CT volume safely.

    Accepts ``.pkl``/``.pickle`` (restricted unpickler: numpy arrays and plain containers only; an array, or a
    dict with the array under image/img/ct/volume/data and optional ``spacing`` / ``affine``), ``.npy``, ``.npz``
    (``allow_pickle=False``), ``.nii`` and ``.nii.gz`` (spacing and affine from the header).

    Returns:
        (D×H×W float32 volume in the file's units (HU for raw CT), {"spacing": (mm, mm, mm) | None,
        "affine": 4×4 float64 | None}).
    Raises:
        VolumeLoadError (a ValueError; UnsafePickleError for a refused pickle) naming the file and the problem:
        missing/unreadable file, unsupported payload, non-3-D array, bool/complex/object/string dtype, non-finite
        voxels, empty or constant volume, malformed spacing/affine.
    """
    volume, meta, _ = _read_image(Path(path))
    return volume, meta


def _binarize_mask(data: np.ndarray, path: Path) -> tuple[np.ndarray, bool]:
    """0/1 (or bool) masks pass; 0/255 masks are read as 0/1 (second value True); anything else is an error."""
    kind = data.dtype.kind
    if kind == "b":
        return data.astype(np.uint8), False
    if kind not in "iuf":
        raise VolumeLoadError(path, f"mask dtype {data.dtype} is not numeric; expected binary 0/1 or 0/255 values")
    if kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            bad = data.size - int(np.count_nonzero(finite))
            raise VolumeLoadError(path, f"mask holds {bad} NaN/inf voxel(s); expected binary 0/1 or 0/255 values")
    nonzero = data != 0
    values = np.unique(data[nonzero])  # foreground is small, so this is cheap
    if values.size == 0 or (values.size == 1 and values[0] == 1):
        return nonzero.astype(np.uint8), False
    if values.size == 1 and values[0] == 255:
        return nonzero.astype(np.uint8), True
    found = ([0.0] if not nonzero.all() else []) + [float(v) for v in values]
    shown = ", ".join(f"{v:g}" for v in found[:12]) + (f", ... ({len(found)} distinct)" if len(found) > 12 else "")
    raise VolumeLoadError(path, f"mask must be binary (0/1, or 0/255 read as 0/1); found values {shown}. "
                                "Reduce a multi-class label map to hemorrhage / no hemorrhage first")


def _read_mask(path: Path) -> tuple[np.ndarray, tuple[float, float, float] | None, str, bool]:
    if _matching_suffix(path.name, MASK_SUFFIXES) is None:
        raise VolumeLoadError(path, "masks must be NIfTI files (.nii or .nii.gz)")
    raw = _read_bytes(path)
    image = _nifti_from_bytes(raw, path)
    data = _nifti_data(image, path)
    while data.ndim > 3 and data.shape[-1] == 1:  # X×Y×Z×1 is a common way to store a 3-D mask
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeLoadError(path, f"expected a 3-D mask, got shape {tuple(data.shape)}")
    mask, was_255 = _binarize_mask(data, path)
    return mask, _nifti_spacing(image), _digest(raw), was_255


def load_mask_file(path: str | os.PathLike, expected_shape: Sequence[int] | None = None) -> np.ndarray:
    """Read a binary NIfTI mask as D×H×W uint8 in {0, 1} (0/255 masks are read as 0/1).

    With ``expected_shape`` (the image's shape) a mask whose axes are a permutation of it is transposed to match
    (see ``matching_axes``; logged as a warning). Raises VolumeLoadError naming the file for non-binary values,
    NaN/inf, a non-3-D array or a shape that cannot match. Its header spacing: ``mask_header_spacing``."""
    path = Path(path)
    mask, _, _, _ = _read_mask(path)
    if expected_shape is not None and tuple(mask.shape) != tuple(expected_shape):
        axes = matching_axes(expected_shape, mask.shape)
        if axes is None:
            raise VolumeLoadError(path, f"mask shape {mask.shape} does not match image shape "
                                        f"{tuple(expected_shape)}, not even with its axes reordered")
        logger.warning("%s: mask shape %s transposed with axes %s to match the image's %s", path, mask.shape, axes,
                       tuple(expected_shape))
        mask = np.ascontiguousarray(mask.transpose(axes))
    return mask


def mask_header_spacing(path: str | os.PathLike) -> tuple[float, float, float] | None:
    """Voxel size (mm, the mask's own axis order) from a NIfTI mask header, or None when the header carries no
    geometry (no qform/sform and pixdim all 1)."""
    path = Path(path)
    return _nifti_spacing(_nifti_from_bytes(_read_bytes(path), path))


class MaskIndex:
    """The masks of one ``mask_dir``, listed once and looked up by file number: 049.pkl -> 049.nii / 049.nii.gz /
    49.nii(.gz) (leading zeros ignored; non-numeric names must match exactly). Build it once per run, not per scan:
    listing a folder of thousands of masks for every scan is quadratic work."""

    def __init__(self, mask_dir: str | os.PathLike):
        self.mask_dir = Path(mask_dir)
        index = _index_masks(str(mask_dir), [])
        if index is None:
            raise VolumeLoadError(mask_dir, "mask_dir is not a folder")
        self._index = index

    def find(self, image_path: str | os.PathLike) -> Path | None:
        """The mask of ``image_path``, or None; VolumeLoadError when several masks match."""
        case_id = case_id_from_path(image_path)
        matches = self._index.get(_mask_key(case_id), [])
        if len(matches) > 1:
            raise VolumeLoadError(image_path, f"several masks match file number {case_id}: "
                                              f"{', '.join(m.name for m in matches)}; keep one")
        return matches[0] if matches else None


def find_mask(image_path: str | os.PathLike, mask_dir: str | os.PathLike) -> Path | None:
    """One-off lookup of an image's mask in ``mask_dir`` (see MaskIndex, which to use for many scans)."""
    return MaskIndex(mask_dir).find(image_path)


def matching_axes(image_shape: Sequence[int], mask_shape: Sequence[int]) -> tuple[int, int, int] | None:
    """Transpose ``axes`` with ``mask.transpose(axes).shape == image_shape``, or None if the shapes are not a
    permutation of each other. Axes of equal size keep their stored order: the shapes cannot tell them apart, and
    moving one axis (e.g. the slice axis, 512×512×30 vs 30×512×512) is the usual way such mismatches arise."""
    image_shape, mask_shape = tuple(image_shape), tuple(mask_shape)
    if image_shape == mask_shape:
        return (0, 1, 2)
    if sorted(image_shape) != sorted(mask_shape):
        return None
    axes: list[int] = []
    for size in image_shape:
        axes.append(next(j for j in range(len(mask_shape)) if j not in axes and mask_shape[j] == size))
    return tuple(axes)  # type: ignore[return-value]


def looks_preprocessed(volume: np.ndarray) -> str | None:
    """Why ``volume`` does not look like raw HU (already windowed / normalised), or None if it does."""
    low, high = float(volume.min()), float(volume.max())
    if low >= 0.0 and high <= 1.0:
        return f"values lie in [{low:g}, {high:g}], which looks already normalised to [0, 1]"
    if low >= 0.0 and high <= 255.0:
        return f"values lie in [{low:g}, {high:g}], which looks like an 8-bit windowed image"
    if low > AIR_THRESHOLD_HU:
        return (f"no voxel below {AIR_THRESHOLD_HU:g} HU (minimum {low:g}): raw head CT always contains air "
                "(about -1000 HU), so this looks windowed, normalised or stored without its rescale intercept")
    return None


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing: the one deterministic pipeline (also used by predict.py)
# ----------------------------------------------------------------------------------------------------------------

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


def _normalize(volume: np.ndarray, data_config: DataConfig) -> np.ndarray:
    low, high = data_config.hu_window
    if data_config.normalization == "zscore":
        inside = volume > low  # voxels above the window floor: the head, not the air around it
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
    elif data_config.normalization == "minmax":
        volume -= low
        volume /= high - low
    elif data_config.normalization != "none":
        raise ValueError(f"unknown normalization {data_config.normalization!r}; expected one of "
                         f"{', '.join(NORMALIZATIONS)}")
    return volume


def preprocess_image(array: np.ndarray, spacing: Sequence[float], data_config: DataConfig,
                     source: str | None = None) -> np.ndarray:
    """Window, normalise and resample one raw CT volume: the single deterministic preprocessing pipeline.

    1. Clip to ``hu_window`` (default -100..200 HU keeps brain 20-45, blood 50-90 and CSF 0-15 at full
       contrast and saturates bone, whose 1000+ HU would otherwise dominate the intensity statistics).
    2. Normalise: "zscore" with mean/std of the voxels above the window floor (inside the head; SAM-Med3D was
       pretrained on z-scored volumes), "minmax" (window -> [0, 1]) or "none".
    3. Resample to ``target_spacing`` (default 1.5 mm isotropic, SAM-Med3D's training spacing) with
       ``resample_to_shape(..., "linear")``.

    Args:
        array: D×H×W raw volume in HU (any real dtype).
        spacing: its voxel spacing in mm, array axis order.
        source: optional file name; when given, a volume that does not look like raw HU is logged as a warning.
    Returns:
        1×D'×H'×W' float32, D'×H'×W' = preprocessed_shape(array.shape, spacing, target_spacing).
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"preprocess_image expects a D×H×W volume, got shape {tuple(array.shape)}")
    spacing = _parse_spacing(spacing, Path(source or "<array>"), "spacing")
    if source is not None:
        reason = looks_preprocessed(array)
        if reason is not None:
            logger.warning("%s: %s; expected raw HU", source, reason)
    low, high = data_config.hu_window
    if not low < high:
        raise ValueError(f"hu_window needs low < high, got {data_config.hu_window}")
    volume = np.clip(array.astype(np.float32), low, high)  # astype copies, so the caller's array is untouched
    volume = _normalize(volume, data_config)
    target = preprocessed_shape(volume.shape, spacing, data_config.target_spacing)
    return np.ascontiguousarray(resample_to_shape(volume, target, "linear")[None], dtype=np.float32)


def cache_key(case: Case, data_config: DataConfig) -> str:
    """Key of a case's preprocessed volume: content hash of its image and mask files plus every parameter that
    changes the result (spacing actually used, mask transpose, window, normalisation, target spacing, pipeline
    version). Any change gives a new key, so a stale entry is never reused."""
    if case.fingerprint is None or case.spacing is None:
        raise ValueError(f"case {case.case_id} ({case.image_path}) has no fingerprint/spacing: build cases with "
                         "validate_cohort, which reads every file once and fills them in")
    recipe = {
        "pipeline_version": PIPELINE_VERSION,
        "content": case.fingerprint,
        "spacing": [float(s) for s in case.spacing],
        "mask_axes": list(case.mask_axes),
        "hu_window": [float(v) for v in data_config.hu_window],
        "normalization": data_config.normalization,
        "target_spacing": [float(s) for s in data_config.target_spacing],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:40]


# ----------------------------------------------------------------------------------------------------------------
# Cohort validation
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Row:
    split: str
    csv: str
    row: int
    image_path: Path
    ich: int | None
    patient_id: str

    @property
    def where(self) -> str:
        return f"{Path(self.csv).name} row {self.row}"


@dataclass
class _Inspection:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    mask_255: str | None = None
    fallback_spacing: str | None = None
    ich_mismatch: str | None = None
    case: Case | None = None
    stats: dict[str, Any] | None = None


def _parse_ich(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def _read_rows(csv_path: Path, split: str, problems: list[Problem]) -> list[_Row]:
    csv_path = Path(os.path.abspath(csv_path.expanduser()))
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        problems.append(Problem(str(csv_path), f"{split} CSV not found"))
        return []
    except pd.errors.EmptyDataError:
        problems.append(Problem(str(csv_path), f"{split} CSV is empty; expected the header path,ich,patient_id"))
        return []
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        problems.append(Problem(str(csv_path), f"cannot read the {split} CSV ({exc})"))
        return []
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        problems.append(Problem(str(csv_path), f"missing column(s) {', '.join(missing)}: expected the header "
                                               f"path,ich,patient_id, found {','.join(frame.columns) or 'none'}"))
        return []
    if frame.empty:
        problems.append(Problem(str(csv_path), f"{split} CSV has a header but no rows"))
        return []
    rows = []
    for number, (path_text, ich_text, patient) in enumerate(
            zip(frame["path"], frame["ich"], frame["patient_id"]), start=1):
        path_text, ich_text, patient = path_text.strip(), ich_text.strip(), patient.strip()
        if not path_text:
            problems.append(Problem("(no path)", "the path is empty", str(csv_path), number))
            continue
        path = Path(path_text).expanduser()
        path = Path(os.path.abspath(path if path.is_absolute() else csv_path.parent / path))
        ich = _parse_ich(ich_text)
        if ich is None:
            problems.append(Problem(str(path), f"ich must be 0 or 1, got {ich_text!r}", str(csv_path), number))
        if not patient:
            problems.append(Problem(str(path), "patient_id is empty", str(csv_path), number))
        rows.append(_Row(split, str(csv_path), number, path, ich, patient))
    return rows


def _index_masks(mask_dir: str | None, problems: list[Problem]) -> dict[str, list[Path]] | None:
    if mask_dir is None:
        return None
    folder = Path(mask_dir).expanduser()
    if not folder.is_dir():
        problems.append(Problem(str(folder), "mask_dir is not a folder"))
        return None
    index: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        suffix = _matching_suffix(path.name, MASK_SUFFIXES)
        if suffix is not None and path.is_file():
            index.setdefault(_mask_key(path.name[: -len(suffix)]), []).append(path)
    return index


def _drop_duplicates(rows: list[_Row], problems: list[Problem]) -> list[_Row]:
    """Each scan once: a repeated path, or two scans with the same file number (they would share a mask and a
    case_id), is an error; only the first occurrence is inspected."""
    by_path: dict[str, _Row] = {}
    by_number: dict[str, _Row] = {}
    kept = []
    for row in rows:
        path_key = os.path.normcase(str(row.image_path))
        number = _mask_key(case_id_from_path(row.image_path))
        if path_key in by_path:
            problems.append(Problem(str(row.image_path), f"duplicate row: the same scan is already listed at "
                                                         f"{by_path[path_key].where}", row.csv, row.row))
        elif number in by_number:
            other = by_number[number]
            problems.append(Problem(str(row.image_path), f"file number {case_id_from_path(row.image_path)} is also "
                                                         f"used by {other.image_path} ({other.where}); masks are "
                                                         "matched by file number, so each scan needs its own",
                                    row.csv, row.row))
        else:
            by_path[path_key] = row
            by_number[number] = row
            kept.append(row)
    return kept


def _inspect_row(row: _Row, mask_index: dict[str, list[Path]] | None, data_config: DataConfig) -> _Inspection:
    """Read one scan (and its mask) once; collect its problems, warnings, resolved geometry and statistics."""
    found = _Inspection()

    def problem(file: str | Path, message: str) -> None:
        found.problems.append(Problem(str(file), message, row.csv, row.row))

    case_id = case_id_from_path(row.image_path)
    matches = mask_index.get(_mask_key(case_id), []) if mask_index is not None else []
    mask_path = matches[0] if len(matches) == 1 else None
    if len(matches) > 1:
        problem(row.image_path, f"several masks match file number {case_id}: "
                                f"{', '.join(m.name for m in matches)}; keep one")
    elif mask_path is None and row.ich == 1:
        where = f"in {data_config.mask_dir}" if data_config.mask_dir is not None else "(no mask_dir given)"
        problem(row.image_path, f"ICH-positive scan has no mask {where}: looked for {case_id}.nii or "
                                f"{case_id}.nii.gz (leading zeros ignored)")

    volume = mask = None
    try:
        volume, meta, image_digest = _read_image(row.image_path, digest=True)
    except VolumeLoadError as exc:
        problem(exc.path, exc.reason)
    if mask_path is not None:
        try:
            mask, mask_spacing, mask_digest, was_255 = _read_mask(mask_path)
        except VolumeLoadError as exc:
            problem(exc.path, exc.reason)
    if volume is None or (mask_path is not None and mask is None):
        return found

    axes = (0, 1, 2)
    if mask is not None and mask.shape != volume.shape:
        permutation = matching_axes(volume.shape, mask.shape)
        if permutation is None:
            problem(mask_path, f"mask shape {mask.shape} does not match image shape {volume.shape} "
                               f"({row.image_path.name}), not even with its axes reordered")
            return found
        axes = permutation
        tie = " (equal-size axes kept in stored order; check the orientation)" if len(set(volume.shape)) < 3 else ""
        found.warnings.append(f"{mask_path}: mask shape {mask.shape} is the image's {volume.shape} with the axes "
                              f"reordered; transposed the mask with axes {axes} to match {row.image_path}{tie}")
        mask = mask.transpose(axes)

    mask_spacing_img = None
    if mask is not None and mask_spacing is not None:
        mask_spacing_img = tuple(mask_spacing[a] for a in axes)  # header spacing follows the mask's own axes
    spacing, source = meta["spacing"], "image"
    if spacing is None and mask_spacing_img is not None:
        spacing, source = mask_spacing_img, "mask_header"
    elif spacing is None:
        spacing, source = tuple(float(s) for s in data_config.spacing), "fallback"
        found.fallback_spacing = str(row.image_path)
    elif mask_spacing_img is not None and not np.allclose(spacing, mask_spacing_img, rtol=0.01):
        found.warnings.append(f"{row.image_path}: spacing {spacing} mm from the image differs from the mask "
                              f"header's {tuple(round(s, 4) for s in mask_spacing_img)} mm; using the image's")
    if any(s < 0.1 or s > 20.0 for s in spacing):
        found.warnings.append(f"{row.image_path}: voxel spacing {spacing} mm ({source}) is outside 0.1-20 mm; "
                              "check the units")
    reason = looks_preprocessed(volume)
    if reason is not None:
        found.warnings.append(f"{row.image_path}: {reason}; expected raw HU")

    blood = int(np.count_nonzero(mask)) if mask is not None else 0
    voxel_ml = float(np.prod(spacing)) / 1000.0
    if mask is None:
        pass  # no mask: fine for ICH-negative scans; a positive one was reported above
    elif row.ich == 1 and blood == 0:
        found.ich_mismatch = f"{row.where} {row.image_path}: ich=1 but the mask {mask_path.name} is empty"
    elif row.ich == 0 and blood > 0:
        found.ich_mismatch = (f"{row.where} {row.image_path}: ich=0 but the mask {mask_path.name} marks "
                              f"{blood} voxels ({blood * voxel_ml:.1f} mL)")
    if mask is not None and was_255:
        found.mask_255 = str(mask_path)
    if row.ich is None or not row.patient_id or found.problems:
        return found

    fingerprint = _digest(f"{image_digest}:{mask_digest if mask is not None else '-'}".encode())
    found.case = Case(image_path=str(row.image_path), mask_path=str(mask_path) if mask_path else None,
                      ich=row.ich, patient_id=row.patient_id, case_id=case_id, csv_path=row.csv, row=row.row,
                      spacing=spacing, spacing_source=source, mask_axes=axes, fingerprint=fingerprint)
    found.stats = _scan_stats(volume, blood, spacing, source, row.split, row.ich, data_config)
    return found


def _scan_stats(volume: np.ndarray, blood_voxels: int, spacing: Sequence[float], spacing_source: str, split: str,
                ich: int, data_config: DataConfig) -> dict[str, Any]:
    sample = np.clip(np.rint(volume.ravel()[::_HIST_STRIDE]), _HIST_LOW, _HIST_HIGH - 1)
    histogram = np.bincount((sample - _HIST_LOW).astype(np.int64), minlength=_HIST_HIGH - _HIST_LOW)
    return {
        "split": split,
        "ich": int(ich),
        "shape": [int(s) for s in volume.shape],
        "spacing": [float(s) for s in spacing],
        "spacing_source": spacing_source,
        "preprocessed_shape": list(preprocessed_shape(volume.shape, spacing, data_config.target_spacing)),
        "hu_min": float(volume.min()),
        "hu_max": float(volume.max()),
        "blood_voxels": int(blood_voxels),
        "blood_ml": blood_voxels * float(np.prod(spacing)) / 1000.0,
        "foreground_fraction": blood_voxels / volume.size,
        "hu_histogram": histogram,
    }


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _io_threads(n_items: int) -> int:
    """Threads for reading volumes: file reads, gzip and most numpy work release the GIL."""
    return max(1, min(8, usable_cpu_count(), n_items))


def validate_cohort(data_config: DataConfig) -> Cohort:
    """Read and check the whole cohort before any model is built; raise once with every problem.

    Errors (collected into one DataValidationError, each naming file and CSV row): missing/unreadable CSV or
    columns, ich not 0/1, empty patient_id, duplicate rows, two scans with one file number, missing/unreadable/
    unsafe image files, bad image arrays (see load_image_file), ICH-positive scan without a mask, several masks for
    one file number, non-binary / NaN masks, image-mask shapes that are not an axis permutation of each other, the
    same patient_id in train and val (unless ``allow_patient_overlap``).

    Warnings (returned in ``Cohort.warnings`` and logged): 0/255 masks read as 0/1, mask transposed to match the
    image, fallback spacing used, image/mask spacing disagreement, implausible spacing, data that does not look
    like raw HU, ich label disagreeing with the mask, allowed patient overlap.

    Relative CSV paths are resolved against the CSV's folder. Every image and mask is read exactly once (in a
    thread pool); what is learned (spacing, mask transpose, content hash, HU histogram, blood volume) is kept in
    the Cases and in ``Cohort.case_stats``.
    """
    started = time.perf_counter()
    problems: list[Problem] = []
    rows: list[_Row] = []
    for split in ("train", "val"):
        csv = getattr(data_config, f"{split}_csv")
        if csv is None:
            problems.append(Problem(f"{split}_csv", f"no {split} CSV given (--{split}_csv)"))
        else:
            rows += _read_rows(Path(csv), split, problems)
    mask_index = _index_masks(data_config.mask_dir, problems)
    unique = _drop_duplicates(rows, problems)
    with ThreadPoolExecutor(max_workers=_io_threads(len(unique))) as pool:
        inspections = list(pool.map(lambda r: _inspect_row(r, mask_index, data_config), unique))

    warnings: list[str] = []
    for inspection in inspections:
        problems += inspection.problems
        warnings += inspection.warnings
    masks_255 = [i.mask_255 for i in inspections if i.mask_255]
    if masks_255:
        warnings.append(f"{len(masks_255)} mask(s) hold 0/255 values and were read as 0/1: {_listing(masks_255)}")
    fallback = [i.fallback_spacing for i in inspections if i.fallback_spacing]
    if fallback:
        warnings.append(f"{len(fallback)} scan(s) carry no voxel spacing (no 'spacing'/'affine' in the file, no "
                        f"informative mask header); used the fallback spacing {tuple(data_config.spacing)} mm "
                        f"for: {_listing(fallback)}")
    mismatches = [i.ich_mismatch for i in inspections if i.ich_mismatch]
    if mismatches:
        warnings.append(f"{len(mismatches)} scan(s) whose ich label disagrees with the mask (kept as given; check "
                        "the labels):\n    " + "\n    ".join(mismatches[:_MAX_LISTED]))

    patients: dict[str, dict[str, list[_Row]]] = {"train": {}, "val": {}}
    for row in rows:
        if row.patient_id:
            patients[row.split].setdefault(row.patient_id, []).append(row)
    overlap = sorted(set(patients["train"]) & set(patients["val"]))
    if overlap and not data_config.allow_patient_overlap:
        for patient in overlap:
            first = patients["val"][patient][0]
            train_rows = ", ".join(str(r.row) for r in patients["train"][patient])
            problems.append(Problem(str(first.image_path), f"patient_id {patient!r} is also in the train CSV (rows "
                                                           f"{train_rows}): patient leakage inflates validation "
                                                           "scores; split by patient or pass "
                                                           "--allow_patient_overlap", first.csv, first.row))
    elif overlap:
        warnings.append(f"{len(overlap)} patient(s) are in both train and val (allowed by allow_patient_overlap; "
                        f"validation scores will be optimistic): {_listing(overlap)}")

    if problems:
        # Read like the CSVs: file-level problems first, then train rows, then val rows, in row order.
        csv_order = {}
        for row in rows:
            csv_order.setdefault(row.csv, len(csv_order))
        problems.sort(key=lambda p: (p.row is not None, csv_order.get(p.csv or "", -1), p.row or 0))
        raise DataValidationError(problems)
    train = [i.case for r, i in zip(unique, inspections) if r.split == "train" and i.case is not None]
    val = [i.case for r, i in zip(unique, inspections) if r.split == "val" and i.case is not None]
    stats = {i.case.case_id: i.stats for i in inspections if i.case is not None and i.stats is not None}
    for message in warnings:
        logger.warning("%s", message)
    logger.info("validated %d scans (train %d, val %d) in %.1f s", len(train) + len(val), len(train), len(val),
                time.perf_counter() - started)
    return Cohort(train=train, val=val, warnings=warnings, case_stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# Transforms: defined once; validation uses the deterministic part
# ----------------------------------------------------------------------------------------------------------------

class LoadPreprocessd(Transform):
    """Case item -> {image: 1×D×H×W float32 (preprocessed), label: 1×D×H×W uint8, ich, case_id}.

    Deterministic. Looks the item's ``cache_key`` up in ``cache_dir`` first (``<key>.npz``, read with
    ``allow_pickle=False``, so a tampered cache cannot run code either); on a miss it reads the raw files, runs
    ``preprocess_image`` (label: nearest-exact onto the same grid) and writes the entry atomically. Safe to call
    from several threads or processes at once.
    """

    def __init__(self, data_config: DataConfig, cache_dir: str | os.PathLike):
        self.data_config = data_config
        self.cache_dir = Path(cache_dir)

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        entry = self.cache_dir / f"{item['cache_key']}.npz"
        arrays = self._read_entry(entry) if entry.exists() else None
        if arrays is None:
            arrays = self._preprocess(item)
            self._write_entry(entry, *arrays)
        image, label = arrays
        return {"image": image, "label": label, "ich": item["ich"], "case_id": item["case_id"]}

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
        image = preprocess_image(volume, item["spacing"], self.data_config)
        if item["mask_path"]:
            mask = load_mask_file(item["mask_path"]).transpose(item["mask_axes"])
            if mask.shape != volume.shape:
                raise ValueError(f"{item['mask_path']}: mask shape {mask.shape} (after transpose "
                                 f"{item['mask_axes']}) differs from image shape {volume.shape}; the files changed "
                                 "after validate_cohort")
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


class PadToRoid(MapTransform):
    """Pad image and label symmetrically to at least roi_size on every axis (deterministic). The image is padded
    with its own minimum, which after windowing is the air value, so padding looks like air rather than the
    mean-tissue zero of a z-scored volume; the label is padded with 0."""

    def __init__(self, roi_size: int, image_key: str = "image", label_key: str = "label"):
        super().__init__([image_key, label_key])
        self.image_key, self.label_key = image_key, label_key
        self.padder = SpatialPad((roi_size,) * 3, method="symmetric", mode="constant")

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        d[self.image_key] = self.padder(d[self.image_key], value=float(d[self.image_key].min()))
        d[self.label_key] = self.padder(d[self.label_key], value=0)
        return d


class RandHemorrhageCropd(Randomizable, MapTransform):
    """One roi³ crop per sample: with probability ``pos_fraction`` centred on a random hemorrhage voxel (scans
    whose label has blood), otherwise on a random voxel inside the head (image above its air minimum), so negative
    crops show tissue rather than empty air. ICH-negative scans always get the head-voxel crops. Centres are moved
    inwards so the crop stays inside the (already padded) volume. Inputs C×D×H×W with every axis >= roi_size."""

    def __init__(self, roi_size: int, pos_fraction: float, image_key: str = "image", label_key: str = "label"):
        super().__init__([image_key, label_key])
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
        self.roi_size, self.pos_fraction = roi_size, pos_fraction
        self.image_key, self.label_key = image_key, label_key

    def randomize(self, data: Any = None) -> None:  # the draws happen in _center, which needs the arrays
        return None

    def _center(self, image: np.ndarray, label: np.ndarray) -> tuple[int, ...]:
        spatial = label.shape[1:]
        # Only the branch taken scans the volume for candidate voxels (this runs for every crop of every epoch).
        if label.any() and self.R.random_sample() < self.pos_fraction:
            pool = np.flatnonzero(label[0])
        else:
            low, high = float(image.min()), float(image.max())
            pool = np.flatnonzero(image[0] > low + 1e-3 * (high - low))
            if pool.size == 0:  # no head found (cannot happen after validation): any voxel
                pool = np.arange(int(np.prod(spatial)))
        center = [int(c) for c in np.unravel_index(pool[self.R.randint(pool.size)], spatial)]
        return correct_crop_centers(center, (self.roi_size,) * 3, spatial)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        image = np.asarray(d[self.image_key])
        label = np.asarray(d[self.label_key])
        if min(label.shape[1:]) < self.roi_size:
            raise ValueError(f"{d.get('case_id')}: volume {label.shape[1:]} is smaller than the crop "
                             f"{self.roi_size}³; pad it first (PadToRoid)")
        cropper = SpatialCrop(roi_center=self._center(image, label), roi_size=(self.roi_size,) * 3)
        for key in (self.image_key, self.label_key):
            d[key] = torch.as_tensor(cropper(d[key])).clone()  # own memory: the cached volume is never touched
        return d


def _intensity_unit(data_config: DataConfig) -> float:
    """Size of 'one head-tissue standard deviation' in the units the normalisation produces."""
    if data_config.normalization == "zscore":
        return 1.0
    if data_config.normalization == "minmax":
        low, high = data_config.hu_window
        return _HEAD_TISSUE_STD_HU / (high - low)
    return _HEAD_TISSUE_STD_HU


@dataclass(frozen=True)
class Transforms:
    """The pipeline, defined once: ``deterministic`` (load + preprocess, cached), ``train_random`` (pad, crop,
    augmentation; reseeded per sample) and ``finalize`` (tensors + the batch keys), shared by train and val."""

    deterministic: Compose
    train_random: Compose
    finalize: Compose


def build_transforms(data_config: DataConfig, roi_size: int, cache_dir: str | os.PathLike,
                     augment_device: torch.device | None = None) -> Transforms:
    """Train: deterministic → train_random → finalize; val: deterministic → finalize.

    Augmentations each fire with ``augmentation_prob``: a mirror per axis, a small affine (±10° per axis,
    ±10 % scale; image bilinear with border padding, label nearest), intensity scale ±10 %, shift ±0.1 and
    Gaussian noise σ 0.05 head-tissue standard deviations (converted for minmax / none normalisation).

    With ``augment_device`` the crop (a cheap slice of the cached volume) is moved there before augmentation, so on
    a GPU the affine resampling — the costly step, ~0.5 s per 128³ crop on a CPU core — runs on the GPU."""
    prob = data_config.augmentation_prob
    unit = _intensity_unit(data_config)
    keys = ["image", "label"]
    deterministic = Compose([LoadPreprocessd(data_config, cache_dir)])
    to_device = [ToDeviced(keys, device=augment_device)] if augment_device is not None else []
    train_random = Compose([
        PadToRoid(roi_size),
        RandHemorrhageCropd(roi_size, data_config.positive_crop_fraction),
        *to_device,
        # No canonical orientation is known (array order is the file's), so every axis may be mirrored.
        RandFlipd(keys, prob=prob, spatial_axis=0),
        RandFlipd(keys, prob=prob, spatial_axis=1),
        RandFlipd(keys, prob=prob, spatial_axis=2),
        RandAffined(keys, prob=prob, rotate_range=(_ROTATE_RAD,) * 3, scale_range=(_SCALE_RANGE,) * 3,
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
    return Transforms(deterministic=deterministic, train_random=train_random, finalize=finalize)


# ----------------------------------------------------------------------------------------------------------------
# Datasets, sampling and loaders
# ----------------------------------------------------------------------------------------------------------------

def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1)[0])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one training sample's random transforms: a function of (seed, epoch, index) only."""
    return _derived_seed(seed, 1, epoch, index)


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` so every sample's randomness can be derived from (seed, epoch, index) in whatever
    worker process loads it. The order comes from the wrapped DistributedSampler (``build_dataloaders`` always
    wraps one, with world size 1 for a single process, so single- and multi-process runs share one permutation).
    Call ``set_epoch`` before each epoch."""

    def __init__(self, inner: DistributedSampler):
        self.inner = inner
        self.epoch = 0
        self._iterated: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.inner.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.epoch in self._iterated:
            logger.warning("training sampler iterated twice for epoch %d: call set_epoch(train_loader, epoch) at "
                           "the start of every epoch, or every epoch repeats the same crops", self.epoch)
        self._iterated.add(self.epoch)
        epoch = self.epoch
        return iter([(index, epoch) for index in self.inner])

    def __len__(self) -> int:
        return len(self.inner)


class StageDataset(torch.utils.data.Dataset):
    """``transform(base[index])``. With a ``seed`` the transform is random and is reseeded per sample from
    (seed, epoch, index); indices are then ``(index, epoch)`` pairs from EpochSampler (a bare int means epoch 0)."""

    def __init__(self, base: torch.utils.data.Dataset, transform: Compose, seed: int | None = None):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        item = dict(self.base[index])
        if self.seed is not None:
            self.transform.set_random_state(seed=sample_seed(self.seed, epoch, index))
        return self.transform(item)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make ``loader``'s next pass epoch ``epoch``: the training sampler's order and every crop/augmentation depend
    only on (seed, epoch). Call before iterating each epoch (also after resuming); harmless on the val loader."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _volume_bytes(shape: Sequence[int]) -> int:
    return int(np.prod(shape)) * 5  # float32 image + uint8 label


def choose_num_workers(data_config: DataConfig, device: torch.device, largest_volume_bytes: int = 0) -> int:
    """DataLoader workers: ``data_config.num_workers`` if set, else one per CPU core left after the training
    process (at most 8), limited so each worker can have ~0.5 GiB + 4 preprocessed volumes of the available RAM."""
    if data_config.num_workers is not None:
        return int(data_config.num_workers)
    by_cpu = max(0, usable_cpu_count() - 1)
    per_worker = 512 * 2**20 + 4 * largest_volume_bytes
    by_memory = int(0.5 * psutil.virtual_memory().available // per_worker)
    workers = max(0, min(8, by_cpu, by_memory))
    logger.info("using %d DataLoader worker(s) (%d CPU cores, %.1f GiB RAM available, device %s)", workers,
                usable_cpu_count(), psutil.virtual_memory().available / 2**30, device)
    return workers


def _loader_settings(workers: int, device: torch.device) -> dict[str, Any]:
    on_cuda = device.type == "cuda"
    return {
        "num_workers": workers,
        "pin_memory": on_cuda,                 # page-locked batches make host->GPU copies asynchronous
        "persistent_workers": workers > 0,     # keep workers (and their copy of the RAM cache) across epochs
        "prefetch_factor": (4 if on_cuda else 2) if workers > 0 else None,
    }


def _case_item(case: Case, data_config: DataConfig) -> dict[str, Any]:
    return {"image_path": case.image_path, "mask_path": case.mask_path or "", "ich": float(case.ich),
            "case_id": case.case_id, "spacing": case.spacing, "mask_axes": case.mask_axes,
            "cache_key": cache_key(case, data_config)}


def _base_dataset(items: list[dict[str, Any]], transform: Compose, in_memory: bool, threads: int
                  ) -> torch.utils.data.Dataset:
    if in_memory and items:
        return CacheDataset(items, transform=transform, num_workers=max(1, threads), progress=False)
    return MonaiDataset(items, transform=transform)


def build_dataloaders(data_config: DataConfig, cohort: Cohort, roi_size: int, batch_size: int,
                      device: torch.device, seed: int, rank: int = 0, world_size: int = 1,
                      augment_on_device: bool | None = None) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders over a validated cohort.

    Train batches: ``image`` B×1×S×S×S float32, ``label`` B×1×S×S×S float32 in {0,1}, ``ich`` (B,) float32,
    ``case_id`` list[str], S = roi_size; one crop per scan per epoch. Val batches (batch 1, whole preprocessed
    volume): ``image`` / ``label`` 1×1×D×H×W, ``ich`` (1,), ``case_id`` [str]; spacing = target_spacing.

    Preprocessed volumes are cached on disk in ``data_config.cache_dir`` (keyed by file content and every
    preprocessing parameter, see ``cache_key``) and, with ``cache_in_memory``, also in RAM (MONAI CacheDataset,
    filled here), so epochs after the first never touch the raw files. With ``world_size > 1`` the train set is
    sharded by DistributedSampler(shuffle, seed) and val by DistributedSampler(shuffle=False, drop_last=False),
    which repeats a few val scans to even the shards when len(val) is not a multiple of world_size.

    On a GPU (``augment_on_device`` None means: when ``device`` is cuda) training crops are augmented on the
    device, MONAI's fast-training recipe: the RAM cache feeds a ThreadDataLoader (a background thread, no worker
    processes, which cannot share a CUDA context), each crop is sliced on the host, copied to the device and
    flipped, resampled and jittered there. Crops and augmentation parameters are the same either way (seeded per
    sample); only the arithmetic moves.

    The trainer must call ``set_epoch(train_loader, epoch)`` before each epoch.
    """
    if roi_size < 1 or batch_size < 1:
        raise ValueError(f"roi_size and batch_size must be >= 1, got {roi_size} and {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if not cohort.train:
        raise ValueError("the cohort has no training scans")
    if data_config.cache_dir is None:
        raise ValueError("data_config.cache_dir is None; resolve it (default <output_dir>/cache) before building "
                         "the loaders")
    device = torch.device(device)
    if augment_on_device is None:
        augment_on_device = device.type == "cuda"
    cache_dir = Path(data_config.cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    transforms = build_transforms(data_config, roi_size, cache_dir,
                                  augment_device=device if augment_on_device else None)
    train_items = [_case_item(c, data_config) for c in cohort.train]
    val_items = [_case_item(c, data_config) for c in cohort.val]

    shapes = [preprocessed_shape(cohort.case_stats[c.case_id]["shape"], c.spacing, data_config.target_spacing)
              for c in cohort.train + cohort.val if c.case_id in cohort.case_stats]
    largest = max((_volume_bytes(s) for s in shapes), default=0)
    workers = choose_num_workers(data_config, device, largest)
    in_memory = data_config.cache_in_memory
    if in_memory and shapes:
        needed = sum(_volume_bytes(s) for s in shapes)
        available = psutil.virtual_memory().available
        if needed > 0.5 * available:
            logger.warning("cache_in_memory needs about %.1f GiB but only %.1f GiB of RAM is available: keeping "
                           "preprocessed volumes on disk only (%s)", needed / 2**30, available / 2**30, cache_dir)
            in_memory = False

    started = time.perf_counter()
    threads = max(1, workers, min(usable_cpu_count(), 4))
    train_base = _base_dataset(train_items, transforms.deterministic, in_memory, threads)
    val_base = _base_dataset(val_items, transforms.deterministic, in_memory, threads)
    if in_memory:
        logger.info("cached %d preprocessed volumes in RAM in %.1f s", len(train_items) + len(val_items),
                    time.perf_counter() - started)
    train_set = StageDataset(train_base, Compose([transforms.train_random, transforms.finalize]), seed=seed)
    val_set = StageDataset(val_base, transforms.finalize)

    # One permutation for every world size: DistributedSampler's, also for a single process. Rank r takes
    # perm[r::world_size], so global step k of a multi-process run sees the same scans (and, seeded per index, the
    # same crops) as step k of a single process whose batch is world_size times larger.
    inner = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                               drop_last=False)
    sampler = EpochSampler(inner)
    if augment_on_device:
        # Batches are born on the device: no pinning, no worker processes; one thread overlaps loading with compute.
        train_loader = ThreadDataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=False,
                                        num_workers=0, buffer_size=2)
        logger.info("training crops are augmented on %s (ThreadDataLoader)", device)
    else:
        train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=False,
                                  generator=torch.Generator().manual_seed(seed), **_loader_settings(workers, device))
    val_sampler = (DistributedSampler(val_set, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
                   if world_size > 1 else None)
    val_loader = DataLoader(val_set, batch_size=1, sampler=val_sampler, shuffle=False,
                            **_loader_settings(min(workers, 2), device))
    return train_loader, val_loader


# ----------------------------------------------------------------------------------------------------------------
# Dataset statistics
# ----------------------------------------------------------------------------------------------------------------

def _stats_for_case(case: Case, split: str, data_config: DataConfig) -> dict[str, Any]:
    """Read a case whose statistics were not gathered by validate_cohort (e.g. a hand-built Cohort)."""
    volume, meta = load_image_file(case.image_path)
    blood = 0
    if case.mask_path:
        blood = int(np.count_nonzero(load_mask_file(case.mask_path)))
    spacing = case.spacing or meta["spacing"] or tuple(data_config.spacing)
    source = case.spacing_source or ("image" if meta["spacing"] else "fallback")
    return _scan_stats(volume, blood, spacing, source, split, case.ich, data_config)


def _percentile_from_histogram(histogram: np.ndarray, q: float) -> float:
    cumulative = np.cumsum(histogram)
    index = int(np.searchsorted(cumulative, q / 100.0 * cumulative[-1], side="left"))
    return float(_HIST_LOW + min(index, histogram.size - 1))


def _summary(values: Sequence[float]) -> dict[str, float]:
    """{min, median, max} of scalars ({} for none)."""
    if not len(values):
        return {}
    array = np.asarray(values, dtype=np.float64)
    return {"min": float(array.min()), "median": float(np.median(array)), "max": float(array.max())}


def _axis_summary(triples: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """{min, median, max} per axis of 3-vectors (shapes, spacings) ({} for none)."""
    if not len(triples):
        return {}
    array = np.asarray(triples, dtype=np.float64)
    return {"min": array.min(axis=0).tolist(), "median": np.median(array, axis=0).tolist(),
            "max": array.max(axis=0).tolist()}


def compute_dataset_stats(cohort: Cohort, data_config: DataConfig) -> dict[str, Any]:
    """Statistics of the cohort as a JSON-ready dict (the trainer writes it to dataset_stats.json).

    Keys: ``splits`` (scans / positive / negative / patients for train, val, all); ``shape``, ``spacing_mm`` and
    ``preprocessed_shape`` ({min, median, max} per axis); ``spacing_sources`` (counts of image / mask_header /
    fallback); ``hu_percentiles`` (p0.5..p99.5 from 1-HU bins over every 4th voxel, values clipped to
    [-1024, 3071]); ``hemorrhage_ml`` over scans whose mask has blood (count, sum, median, min, max: mask voxels ×
    voxel volume at the original spacing); ``foreground_fraction`` (overall blood / all voxels, and {min, median,
    max} per scan with blood); ``cases`` (the per-scan numbers). Reuses what validate_cohort read and only reads
    cases it has no statistics for.
    """
    rows = []
    histogram = np.zeros(_HIST_HIGH - _HIST_LOW, dtype=np.int64)
    for split, cases in (("train", cohort.train), ("val", cohort.val)):
        for case in cases:
            stats = cohort.case_stats.get(case.case_id) or _stats_for_case(case, split, data_config)
            histogram += stats["hu_histogram"]
            rows.append((case, {k: v for k, v in stats.items() if k != "hu_histogram"}))

    def counts(selected: list[tuple[Case, dict[str, Any]]]) -> dict[str, int]:
        return {"scans": len(selected), "positive": sum(c.ich == 1 for c, _ in selected),
                "negative": sum(c.ich == 0 for c, _ in selected),
                "patients": len({c.patient_id for c, _ in selected})}

    bleeding = [s for _, s in rows if s["blood_voxels"] > 0]
    total_voxels = sum(int(np.prod(s["shape"])) for _, s in rows)
    hu = ({f"p{q:g}": _percentile_from_histogram(histogram, q) for q in (0.5, 1, 5, 25, 50, 75, 95, 99, 99.5)}
          if histogram.sum() else {})
    return {
        "n_scans": len(rows),
        "splits": {"train": counts([r for r in rows if r[1]["split"] == "train"]),
                   "val": counts([r for r in rows if r[1]["split"] == "val"]),
                   "all": counts(rows)},
        "shape": _axis_summary([s["shape"] for _, s in rows]),
        "spacing_mm": _axis_summary([s["spacing"] for _, s in rows]),
        "spacing_sources": dict(sorted(collections.Counter(s["spacing_source"] for _, s in rows).items())),
        "target_spacing_mm": [float(s) for s in data_config.target_spacing],
        "preprocessed_shape": _axis_summary([s["preprocessed_shape"] for _, s in rows]),
        "hu_percentiles": hu,
        "hemorrhage_ml": {"scans": len(bleeding), "sum": float(sum(s["blood_ml"] for s in bleeding)),
                          **_summary([s["blood_ml"] for s in bleeding])},
        "foreground_fraction": {
            "overall": sum(s["blood_voxels"] for _, s in rows) / total_voxels if total_voxels else 0.0,
            **_summary([s["foreground_fraction"] for s in bleeding])},
        "cases": [{"case_id": c.case_id, "patient_id": c.patient_id, **s} for c, s in rows],
    }


def format_stats_table(stats: Mapping[str, Any]) -> str:
    """A short multi-line table of ``compute_dataset_stats`` output (also after a JSON round trip) for the log."""

    def triple(summary: Mapping[str, Sequence[float]], fmt: str) -> str:
        if not summary:
            return "-"
        return " / ".join("×".join(format(v, fmt) for v in summary[key]) for key in ("min", "median", "max"))

    lines = [f"{'split':<8}{'scans':>7}{'ICH+':>7}{'ICH-':>7}{'patients':>10}"]
    for split in ("train", "val", "all"):
        c = stats["splits"][split]
        lines.append(f"{split:<8}{c['scans']:>7}{c['positive']:>7}{c['negative']:>7}{c['patients']:>10}")
    target = "×".join(f"{s:g}" for s in stats["target_spacing_mm"])
    lines += [
        f"shape       (min / median / max)  {triple(stats['shape'], '.0f')}",
        f"spacing mm  (min / median / max)  {triple(stats['spacing_mm'], '.3g')}",
        "spacing from                      " + ", ".join(f"{k} {v}" for k, v in stats["spacing_sources"].items()),
        f"at {target} mm (min / median / max)  {triple(stats['preprocessed_shape'], '.0f')}",
    ]
    if stats["hu_percentiles"]:
        lines.append("HU percentiles                    "
                     + "  ".join(f"{k} {v:.0f}" for k, v in stats["hu_percentiles"].items()))
    blood = stats["hemorrhage_ml"]
    lines.append(f"hemorrhage mL ({blood['scans']} scans with blood)  "
                 + (f"sum {blood['sum']:.1f}  median {blood['median']:.1f}  range {blood['min']:.1f}-{blood['max']:.1f}"
                    if blood["scans"] else "none"))
    fraction = stats["foreground_fraction"]
    lines.append(f"foreground fraction               overall {fraction['overall']:.2e}"
                 + (f"  median per scan with blood {fraction['median']:.2e}" if "median" in fraction else ""))
    return "\n".join(lines)
