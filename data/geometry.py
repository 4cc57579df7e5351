"""Where a mask's voxels lie relative to its image's, and whether what a mask marks looks like blood.

A mask is only as good as its alignment: a flipped axis, a shifted origin or two equal-size axes swapped all keep
the shapes equal and train on the wrong voxels without a word. When the image and the mask both carry an affine
(NIfTI headers with a qform/sform, a pkl ``affine``), the mask is brought into the image's voxel grid with
nibabel's orientation tools and the two grids are compared in millimetres (``align_mask``). Whatever the files
carry, an ICH-positive mask must sit on blood inside the head (``label_problem``), which also catches what no
header can tell: a ``.pkl`` image without an affine whose mask belongs to another scan or another orientation.

The orientation found is stored as a transpose plus flips (``MaskOrientation``, applied by ``orient_mask``): the
cohort's ``Case`` keeps it, the cache applies it and hashes it into the cache key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from nibabel.orientations import inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from data.io import VolumeLoadError, matching_axes, read_mask

# Grids agree when the mask's voxel centres are within half a voxel of the image's and the voxel sizes within
# 0.1 %: less is float rounding of the headers, more moves the label onto other tissue.
ORIGIN_TOLERANCE_VOXELS = 0.5
SPACING_RELATIVE_TOLERANCE = 1e-3
# Label sanity of an ICH-positive mask, in raw HU: acute blood is 50-90 HU, clotted or mixed 30-100; air is about
# -1000 and bone 700+. More than 5 % of the mask in air or bone is not partial volume at its border: the mask lies
# outside the head or on the skull, i.e. it belongs to another grid.
BLOOD_MEDIAN_HU = (30.0, 100.0)
AIR_BELOW_HU = -200.0
BONE_ABOVE_HU = 300.0
MAX_OUTSIDE_FRACTION = 0.05
OVERRIDE_FLAG = "--allow_unusual_masks"


class MaskOrientation(NamedTuple):
    """``mask.transpose(axes)``, then flip the (image) axes where ``flips`` is 1: the mask in the image's grid."""

    axes: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[int, int, int] = (0, 0, 0)

    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)

    def describe(self) -> str:
        flipped = [str(axis) for axis, flip in enumerate(self.flips) if flip]
        parts = [f"axes {self.axes}"] if self.axes != (0, 1, 2) else []
        parts += [f"flipped image axis {', '.join(flipped)}"] if flipped else []
        return " and ".join(parts) or "unchanged"


class Alignment(NamedTuple):
    """How a mask maps onto its image: the orientation to apply (None when no orientation gives the image's shape)
    and why the grids disagree (the shape, or a ``grid_disagreement``; None when they agree or nothing could be
    compared). ``from_affines``: the orientation was read from both affines rather than guessed from the shapes."""

    orientation: MaskOrientation | None
    disagreement: str | None
    from_affines: bool = False


def orient_mask(mask: np.ndarray, orientation: MaskOrientation | Sequence[Sequence[int]]) -> np.ndarray:
    """The mask in the image's grid (a contiguous copy when anything moved)."""
    axes, flips = orientation
    oriented = mask.transpose(tuple(axes))
    flipped = tuple(axis for axis, flip in enumerate(flips) if flip)
    if flipped:
        oriented = np.flip(oriented, axis=flipped)
    return oriented if tuple(axes) == (0, 1, 2) and not flipped else np.ascontiguousarray(oriented)


def _orientation_between(image_affine: np.ndarray, mask_affine: np.ndarray) -> MaskOrientation:
    """The transpose and flips that put the mask's axes along the image's (nearest world axes of each affine)."""
    transform = ornt_transform(io_orientation(mask_affine), io_orientation(image_affine))
    axes = tuple(int(np.flatnonzero(transform[:, 0] == out)[0]) for out in range(3))
    flips = tuple(int(transform[axes[out], 1] < 0) for out in range(3))
    return MaskOrientation(axes, flips)  # type: ignore[arg-type]


def _oriented_affine(mask_affine: np.ndarray, mask_shape: Sequence[int], orientation: MaskOrientation
                     ) -> np.ndarray:
    """The mask's affine once ``orient_mask`` has moved its voxels (the same world positions)."""
    transform = np.zeros((3, 2))
    for out, source in enumerate(orientation.axes):
        transform[source] = (out, -1 if orientation.flips[out] else 1)
    return mask_affine @ inv_ornt_aff(transform, tuple(mask_shape))


def _mm(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in values) + ") mm"


def grid_disagreement(image_affine: np.ndarray, mask_affine: np.ndarray, shape: Sequence[int]) -> str | None:
    """Why two voxel grids of the same ``shape`` and axis order do not coincide (voxel size, origin or direction),
    in millimetres; None when they agree within the tolerances."""
    image_spacing = np.linalg.norm(image_affine[:3, :3], axis=0)
    mask_spacing = np.linalg.norm(mask_affine[:3, :3], axis=0)
    if not np.allclose(mask_spacing, image_spacing, rtol=SPACING_RELATIVE_TOLERANCE, atol=0):
        return (f"voxel size {_mm(mask_spacing)} differs from the image's {_mm(image_spacing)} (by "
                f"{_mm(mask_spacing - image_spacing)})")
    shift = mask_affine[:3, 3] - image_affine[:3, 3]
    to_image = np.linalg.inv(image_affine) @ mask_affine  # mask voxel -> image voxel: the identity when aligned
    if np.abs(to_image[:3, 3]).max() > ORIGIN_TOLERANCE_VOXELS:
        return (f"origin {_mm(mask_affine[:3, 3])} differs from the image's {_mm(image_affine[:3, 3])}: the mask "
                f"is shifted by {_mm(shift)} ({np.linalg.norm(shift):.1f} mm)")
    # Same voxel size and origin, yet rotated: measure how far the far corners drift.
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], indexing="ij")).reshape(3, -1)
    drift = np.abs(to_image[:3, :3] @ corners - corners).max()
    if drift > ORIGIN_TOLERANCE_VOXELS:
        return (f"axis directions differ from the image's (a rotated grid): voxels drift by up to {drift:.1f} "
                "voxels across the volume")
    return None


def align_mask(image_affine: np.ndarray | None, mask_affine: np.ndarray | None, mask_shape: Sequence[int],
               image_shape: Sequence[int]) -> Alignment:
    """How to bring a mask into its image's voxel grid.

    With both affines: the orientation from the affines (a swap of two equal-size axes or a flip included, which
    shapes cannot reveal), then the grids compared (``grid_disagreement``; a shape that still differs is one too).
    Without: the shape-only transpose of ``matching_axes`` (equal-size axes keep their stored order); a shape that
    is no permutation of the image's is a disagreement.
    """
    if image_affine is not None and mask_affine is not None:
        orientation = _orientation_between(image_affine, mask_affine)
        oriented_shape = tuple(int(mask_shape[a]) for a in orientation.axes)
        if oriented_shape != tuple(image_shape):
            return Alignment(None, f"mask shape {tuple(mask_shape)} is {oriented_shape} in the image's orientation "
                                   f"(from both affines), but the image's shape is {tuple(image_shape)}", True)
        oriented = _oriented_affine(mask_affine, mask_shape, orientation)
        return Alignment(orientation, grid_disagreement(image_affine, oriented, image_shape), True)
    axes = matching_axes(image_shape, mask_shape)
    if axes is None:
        return Alignment(None, f"mask shape {tuple(mask_shape)} does not match image shape {tuple(image_shape)}, "
                               "not even with its axes reordered")
    return Alignment(MaskOrientation(axes), None)


def load_mask_for_image(path: str | os.PathLike, image_shape: Sequence[int], image_affine: np.ndarray | None
                        ) -> tuple[np.ndarray, MaskOrientation]:
    """A binary mask read and brought into its image's grid (``align_mask``): what predict.py evaluates against.
    VolumeLoadError naming the mask when the grids disagree."""
    path = Path(path)
    mask, _, _, _, mask_affine = read_mask(path)
    alignment = align_mask(image_affine, mask_affine, mask.shape, image_shape)
    if alignment.orientation is None or alignment.disagreement is not None:
        raise VolumeLoadError(path, alignment.disagreement)
    return orient_mask(mask, alignment.orientation), alignment.orientation


def label_findings(volume: np.ndarray, mask: np.ndarray) -> str | None:
    """What an ICH-positive mask (in the image's grid) marks that is not hemorrhage in the raw-HU ``volume``, as
    "the mask does not lie on blood: ..." without advice (``predict.py`` warns with it); None when it looks right."""
    values = volume[mask > 0]
    if values.size == 0:
        return None
    # Air and bone are counted inside the mask's one-voxel rim: a subdural crescent drawn right against the skull
    # has partial-volume voxels of 300-700 HU on its edge (measured: 5-7 % of a thin crescent at 0.45 mm in-plane),
    # while a mask that belongs to another scan or orientation lies in air or bone through and through.
    interior = volume[ndimage.binary_erosion(mask > 0)]
    counted = interior if interior.size else values
    air = float(np.count_nonzero(counted < AIR_BELOW_HU)) / counted.size
    bone = float(np.count_nonzero(counted > BONE_ABOVE_HU)) / counted.size
    median = float(np.median(values))
    low, high = BLOOD_MEDIAN_HU
    found = []
    if air > MAX_OUTSIDE_FRACTION:
        found.append(f"{100 * air:.0f} % of its voxels are air (< {AIR_BELOW_HU:g} HU), i.e. outside the head")
    if bone > MAX_OUTSIDE_FRACTION:
        found.append(f"{100 * bone:.0f} % of its voxels are bone (> {BONE_ABOVE_HU:g} HU)")
    if not low <= median <= high:
        found.append(f"its median is {median:.0f} HU where blood is {low:g}-{high:g} HU")
    return f"the mask does not lie on blood: {'; '.join(found)}" if found else None


def label_problem(volume: np.ndarray, mask: np.ndarray) -> str | None:
    """``label_findings`` with the validator's advice: why an ICH-positive mask (in the image's grid, not empty)
    does not look like hemorrhage (too much of it in air or bone, or a median HU outside ``BLOOD_MEDIAN_HU``)."""
    findings = label_findings(volume, mask)
    if findings is None:
        return None
    return (f"{findings}. It probably belongs to another scan or orientation; if it is right (e.g. chronic, "
            f"hypodense blood), pass {OVERRIDE_FLAG}")
