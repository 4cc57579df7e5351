"""Sizes before work: what reading, preprocessing and caching a cohort will take, against the RAM and disk there are.

Cohort validation asks these questions before any model is built, so settings that cannot fit (``--target_spacing
0.1 0.1 0.1`` turns a 64×64×16 scan into 960×960×640 voxels) are refused with the numbers instead of ending in a
``MemoryError`` while the cache fills. Files big enough to matter are sized from their headers (``.npy``, NIfTI)
before they are read; other files by their size on disk.
"""
from __future__ import annotations

import gzip
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import psutil

from data.preprocess import preprocessed_shape

GB = 1024**3
# Bytes per voxel the cache stores: float32 image + uint8 label (npz, uncompressed).
CACHE_BYTES_PER_VOXEL = 5
# Peak RAM of preprocessing one scan, per voxel: the float32 normalised input and the mask as float32 (8 per input
# voxel), then resampled image, label and interpolation buffers plus the npz written to memory before the atomic
# write (~24 per output voxel). Measured peaks of the pipeline stay below this.
PREPROCESS_BYTES_PER_INPUT_VOXEL = 8
PREPROCESS_BYTES_PER_OUTPUT_VOXEL = 24
# Reading a file for validation holds its bytes, the decoded array and the float32 copy at once.
_FLOAT32 = 4
# Volumes whose longest preprocessed axis is under this fraction of the model's input side are mostly padding.
SMALL_VOLUME_FRACTION = 0.25


def available_memory_bytes() -> int:
    """RAM available to this process now (what the kernel could give without swapping)."""
    return int(psutil.virtual_memory().available)


def free_disk_bytes(folder: str | os.PathLike) -> int:
    """Free space on the disk of ``folder`` (or of its nearest existing parent: it may not exist yet)."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return int(shutil.disk_usage(path).free)


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / GB:.1f} GB" if n_bytes >= 0.1 * GB else f"{n_bytes / 2**20:.0f} MB"


def _shape_text(shape: Sequence[int]) -> str:
    return "×".join(str(int(n)) for n in shape)


def header_shape(path: Path) -> tuple[tuple[int, ...], int] | None:
    """(array shape, bytes per voxel) from a ``.npy`` or NIfTI header without reading the voxels; None for other
    kinds or an unreadable header (the full read reports what is wrong with it)."""
    name = path.name.lower()
    try:
        if name.endswith(".npy"):
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(handle)
            return tuple(int(n) for n in shape), int(np.dtype(dtype).itemsize)
        if name.endswith((".nii", ".nii.gz")):
            header = nib.load(str(path)).header  # a lazy proxy: only the header is read (and un-gzipped)
            return tuple(int(n) for n in header.get_data_shape()), int(header.get_data_dtype().itemsize)
    except (OSError, ValueError, EOFError, gzip.BadGzipFile, nib.filebasedimages.ImageFileError):
        return None
    return None


def reading_problem(path: Path) -> str | None:
    """Why reading ``path`` whole to validate it would not fit in the RAM available, or None. Sized from the header
    where the format has one, else from the file size (a pickled array is about as large as its file)."""
    try:
        file_bytes = path.stat().st_size
    except OSError:
        return None  # missing or unreadable: the read reports it
    header = header_shape(path)
    if header is not None:
        shape, itemsize = header
        voxels = math.prod(shape)
        needed = file_bytes + voxels * (itemsize + _FLOAT32)
        what = f"a {_shape_text(shape)} array of {_gb(voxels * itemsize)}"
    else:
        needed = 3 * file_bytes  # bytes, array and a float32 copy no larger than twice an int16 array
        what = f"a {_gb(file_bytes)} file"
    available = available_memory_bytes()
    if needed <= available:
        return None
    return (f"{what}: reading it to check needs about {_gb(needed)} of RAM, but {_gb(available)} is available; "
            "crop or downsample the scan first, or run on a machine with more memory")


def preprocessing_problem(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
                          ) -> tuple[tuple[int, int, int], str | None]:
    """(preprocessed shape, why preprocessing this scan would not fit in RAM or None)."""
    target = preprocessed_shape(shape, spacing, target_spacing)
    needed = (PREPROCESS_BYTES_PER_INPUT_VOXEL * math.prod(shape)
              + PREPROCESS_BYTES_PER_OUTPUT_VOXEL * math.prod(target))
    available = available_memory_bytes()
    if needed <= available:
        return target, None
    spacing_text = " ".join(f"{s:g}" for s in target_spacing)
    return target, (f"at --target_spacing {spacing_text} mm this {_shape_text(shape)} scan becomes "
                    f"{_shape_text(target)} voxels ({_gb(cache_bytes(target))} cached), which needs about "
                    f"{_gb(needed)} of RAM to preprocess; {_gb(available)} is available. Use a coarser "
                    "--target_spacing (SAM-Med3D was pretrained at 1.5 mm)")


def cache_bytes(shape: Sequence[int]) -> int:
    """Size of one cache entry of a preprocessed volume of ``shape``."""
    return CACHE_BYTES_PER_VOXEL * math.prod(shape)


def cache_problem(total_bytes: int, cache_dir: str | os.PathLike) -> str | None:
    """Why the cache of ``total_bytes`` would not fit on the disk of ``cache_dir``, or None. Entries already there
    (a rerun, or a shared cache) count as space the cache may reuse."""
    folder = Path(cache_dir).expanduser()
    existing = sum(p.stat().st_size for p in folder.glob("*.npz")) if folder.is_dir() else 0
    free = free_disk_bytes(folder)
    if total_bytes <= free + existing:
        return None
    return (f"the preprocessed cache needs about {_gb(total_bytes)} but the disk of {folder} has {_gb(free)} free; "
            "free space there, pass --cache_dir on a larger disk, or use a coarser --target_spacing")


def small_volume_warning(shapes: Sequence[Sequence[int]], input_size: int, target_spacing: Sequence[float]
                         ) -> str | None:
    """A warning when the typical preprocessed volume is far smaller than the model's S×S×S input (its longest axis
    under ``SMALL_VOLUME_FRACTION`` × S): crops are then mostly padding and the anatomy a few voxels wide."""
    if not shapes:
        return None
    longest = sorted(max(shape) for shape in shapes)
    typical = longest[len(longest) // 2]
    if typical >= SMALL_VOLUME_FRACTION * input_size:
        return None
    example = min(shapes, key=lambda shape: abs(max(shape) - typical))
    spacing_text = " ".join(f"{s:g}" for s in target_spacing)
    return (f"at --target_spacing {spacing_text} mm the preprocessed volumes are tiny (typically "
            f"{_shape_text(example)} voxels) next to the model's {input_size}³ input: crops are mostly padding "
            "and a hemorrhage spans a voxel or two; use a finer --target_spacing (SAM-Med3D: 1.5 mm)")
