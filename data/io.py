"""Reading scans and masks safely, their geometry, and the one rule that decides a scan's voxel spacing.

Every reader of the project (cohort validation, the training cache, ``predict.py``, the BLIP-2 helper) goes through
these functions, so they accept the same file kinds (``IMAGE_SUFFIXES``) and resolve spacing the same way
(``resolve_spacing``). Pickles are opened with a restricted unpickler: nothing in a file is ever run.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import io
import logging
import math
import os
import pickle
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".pkl", ".pickle", ".npy", ".npz", ".nii")
MASK_SUFFIXES = (".nii.gz", ".nii")
ARRAY_KEYS = ("image", "img", "ct", "volume", "data")  # where a pkl/npz dict may keep the volume
# Raw head CT always contains air (about -1000 HU); a volume without any voxel below this is not raw HU.
AIR_THRESHOLD_HU = -500.0
_TORCH_FILE_ADVICE = ("it looks like a torch.save file (tensors are stored by reference), but only numpy arrays, "
                      "dtypes, numpy scalars and plain containers are accepted; nothing in it was run. Save the "
                      "volume with numpy (pickle.dump(tensor.numpy(), f) or np.save) or as NIfTI")
# The first of the pickles torch.save(..., _use_new_zipfile_serialization=False) writes one after the other.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_BAD_DTYPE_KINDS = {"b": "boolean", "c": "complex", "O": "Python object", "U": "string", "S": "bytes",
                    "V": "structured", "M": "datetime", "m": "timedelta"}

Spacing = tuple[float, float, float]


class VolumeLoadError(ValueError):
    """A single image or mask file cannot be used; the message starts with the file's path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class UnsafePickleError(VolumeLoadError):
    """A pickle referenced something other than numpy arrays and plain containers; nothing from it was run."""


# The restricted unpickler: hand-written on purpose, because pickle's only hook for refusing code is
# ``find_class``; no library offers a safe loader for numpy pickles.

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

    def persistent_load(self, pid: Any) -> Any:
        # Only torch.save (and similar frameworks) write persistent references; a numpy pickle never does.
        raise UnsafePickleError(self._source, f"refused to unpickle: {_TORCH_FILE_ADVICE}")

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                self._source,
                f"refused to unpickle: the file references {module}.{name}, but only numpy arrays, dtypes, numpy "
                "scalars and plain containers (dict, list, tuple, str, numbers) are accepted; nothing in it was run")
        return obj


def _unpickle(raw: bytes, path: Path) -> Any:
    if raw[:4] == b"PK\x03\x04":  # torch.save's default format is a zip archive around a pickle
        raise UnsafePickleError(path, f"refused to unpickle: the file is a zip archive; {_TORCH_FILE_ADVICE}")
    try:
        payload = _VolumeUnpickler(io.BytesIO(raw), str(path)).load()
        if isinstance(payload, int) and payload == _TORCH_LEGACY_MAGIC:  # torch.save's old format starts so
            raise UnsafePickleError(path, f"refused to unpickle: {_TORCH_FILE_ADVICE}")
        return payload
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


def content_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:32]  # sha256: hardware-accelerated on current CPUs, releases the GIL


def _matching_suffix(name: str, suffixes: Sequence[str]) -> str | None:
    lower = name.lower()
    return next((s for s in suffixes if lower.endswith(s)), None)


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a file kind the readers accept (one of ``IMAGE_SUFFIXES``)."""
    return _matching_suffix(Path(path).name, IMAGE_SUFFIXES) is not None


def case_id_from_path(path: str | os.PathLike) -> str:
    """The file's name without its volume suffix: ``/data/ct/049.pkl`` and ``049.nii.gz`` -> ``"049"``."""
    name = Path(path).name
    suffix = _matching_suffix(name, IMAGE_SUFFIXES)
    return name[: -len(suffix)] if suffix else Path(name).stem


def mask_key(stem: str) -> str:
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


def nifti_world_affine(image: nib.Nifti1Image) -> np.ndarray | None:
    """The header's voxel-to-world affine when the file sets one (qform or sform code > 0), else None: without
    either, nibabel's affine is a guess from pixdim (centred, x flipped) that says nothing about the scanner."""
    if int(image.header["sform_code"]) == 0 and int(image.header["qform_code"]) == 0:
        return None
    return np.asarray(image.affine, dtype=np.float64)


def _without_trailing_singletons(data: np.ndarray) -> np.ndarray:
    """X×Y×Z×1 (×1...) is a common way to store a 3-D volume in NIfTI: drop the trailing length-1 axes."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


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


def slice_axis(spacing: Sequence[float]) -> int:
    """The axis with the largest spacing (the last such axis on ties): the slice axis of a CT series."""
    spacing = list(spacing)
    return len(spacing) - 1 - int(np.argmax(spacing[::-1]))


def parse_spacing(value: Any, path: Path, what: str) -> tuple[float, float, float]:
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
        spacing = parse_spacing(meta["spacing"], path, "'spacing'")
    elif affine is not None:
        spacing = parse_spacing(np.linalg.norm(affine[:3, :3], axis=0), path, "the voxel size of 'affine'")
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
    return _without_trailing_singletons(_nifti_data(image, path)), {"spacing": spacing,
                                                                    "affine": nifti_world_affine(image)}


def validated_ct_volume(array: Any, path: Path) -> np.ndarray:
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


def read_image(path: Path, digest: bool = False) -> tuple[np.ndarray, dict[str, Any], str | None]:
    """(volume, geometry, content hash of the file bytes if ``digest``) from a single read of the file."""
    raw = _read_bytes(path)
    array, meta = _decode_image(raw, path)
    volume = validated_ct_volume(array, path)
    return volume, _geometry(meta, path), content_digest(raw) if digest else None


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
    volume, meta, _ = read_image(Path(path))
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


def read_mask(path: Path) -> tuple[np.ndarray, Spacing | None, str, bool, np.ndarray | None]:
    """(D×H×W uint8 mask in {0, 1}, header spacing or None, content hash, whether it held 0/255, the header's
    world affine or None (``nifti_world_affine``)) from one read."""
    if _matching_suffix(path.name, MASK_SUFFIXES) is None:
        raise VolumeLoadError(path, "masks must be NIfTI files (.nii or .nii.gz)")
    raw = _read_bytes(path)
    image = _nifti_from_bytes(raw, path)
    data = _without_trailing_singletons(_nifti_data(image, path))
    if data.ndim != 3:
        raise VolumeLoadError(path, f"expected a 3-D mask, got shape {tuple(data.shape)}")
    mask, was_255 = _binarize_mask(data, path)
    return mask, _nifti_spacing(image), content_digest(raw), was_255, nifti_world_affine(image)


def load_mask_file(path: str | os.PathLike, expected_shape: Sequence[int] | None = None) -> np.ndarray:
    """Read a binary NIfTI mask as D×H×W uint8 in {0, 1} (0/255 masks are read as 0/1).

    With ``expected_shape`` (the image's shape) a mask whose axes are a permutation of it is transposed to match
    (see ``matching_axes``; logged as a warning). Raises VolumeLoadError naming the file for non-binary values,
    NaN/inf, a non-3-D array or a shape that cannot match. Its header spacing: ``mask_header_spacing``."""
    path = Path(path)
    mask = read_mask(path)[0]
    if expected_shape is not None and tuple(mask.shape) != tuple(expected_shape):
        axes = matching_axes(expected_shape, mask.shape)
        if axes is None:
            raise VolumeLoadError(path, f"mask shape {mask.shape} does not match image shape "
                                        f"{tuple(expected_shape)}, not even with its axes reordered")
        logger.warning("%s: mask shape %s transposed with axes %s to match the image's %s", path, mask.shape, axes,
                       tuple(expected_shape))
        mask = np.ascontiguousarray(mask.transpose(axes))
    return mask


class MaskHeader(NamedTuple):
    """A NIfTI mask's shape and geometry, in the mask's own axis order; spacing None when the header carries no
    geometry (no qform/sform and pixdim all 1)."""

    shape: tuple[int, int, int]
    spacing: Spacing | None
    affine: np.ndarray


def read_mask_header(path: str | os.PathLike) -> MaskHeader:
    """Shape, voxel size (mm) and affine of a NIfTI mask, without decoding its voxels."""
    path = Path(path)
    image = _nifti_from_bytes(_read_bytes(path), path)
    return MaskHeader(tuple(int(n) for n in image.shape[:3]), _nifti_spacing(image), image.affine)


def mask_header_spacing(path: str | os.PathLike) -> Spacing | None:
    """Voxel size (mm, the mask's own axis order) from a NIfTI mask header, or None (see ``MaskHeader``)."""
    return read_mask_header(path).spacing


def resolve_spacing(image_spacing: Sequence[float] | None, mask_spacing: Sequence[float] | None,
                    fallback: Sequence[float]) -> tuple[Spacing, str]:
    """The one spacing rule of every reader: (spacing in mm, its source), first found of the image's own (pkl
    ``spacing`` or ``affine``, NIfTI header) -> ``"image"``, the mask header's, already in the image's axis order
    (see ``in_image_axes``) -> ``"mask_header"``, the run's fallback -> ``"fallback"``."""
    if image_spacing is not None:
        return tuple(float(s) for s in image_spacing), "image"  # type: ignore[return-value]
    if mask_spacing is not None:
        return tuple(float(s) for s in mask_spacing), "mask_header"  # type: ignore[return-value]
    return tuple(float(s) for s in fallback), "fallback"  # type: ignore[return-value]


def in_image_axes(mask_spacing: Sequence[float] | None, axes: Sequence[int] | None) -> Spacing | None:
    """A mask header's spacing reordered with the transpose ``axes`` that maps the mask onto the image (the header
    describes the mask's own axes); None when there is no spacing or no such transpose."""
    if mask_spacing is None or axes is None:
        return None
    return tuple(float(mask_spacing[a]) for a in axes)  # type: ignore[return-value]


class MaskIndex:
    """The masks of one ``mask_dir``, listed once and looked up by file number: 049.pkl -> 049.nii / 049.nii.gz /
    49.nii(.gz) (leading zeros ignored; non-numeric names must match exactly). Build it once per run, not per scan:
    listing a folder of thousands of masks for every scan is quadratic work."""

    def __init__(self, mask_dir: str | os.PathLike):
        self.mask_dir = Path(mask_dir).expanduser()
        if not self.mask_dir.is_dir():
            raise VolumeLoadError(mask_dir, "mask_dir is not a folder")
        self._index: dict[str, list[Path]] = {}
        for path in sorted(self.mask_dir.iterdir()):
            suffix = _matching_suffix(path.name, MASK_SUFFIXES)
            if suffix is not None and path.is_file():
                self._index.setdefault(mask_key(path.name[: -len(suffix)]), []).append(path)

    def matches(self, image_path: str | os.PathLike) -> list[Path]:
        """Every mask named with ``image_path``'s file number (more than one is an error for the caller)."""
        return list(self._index.get(mask_key(case_id_from_path(image_path)), []))

    def find(self, image_path: str | os.PathLike) -> Path | None:
        """The mask of ``image_path``, or None; VolumeLoadError when several masks match."""
        case_id = case_id_from_path(image_path)
        matches = self.matches(image_path)
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

