"""Lesion copy-paste augmentation: the training set's own hemorrhages, moved to other places of other crops.

A small cohort shows each kind of bleed in few places: in the learning benchmark's reproduction cohort two of
thirteen training bleeds lie against the skull, and a tiny model trained from scratch learned that blood-dense
tissue next to the inner table is not blood (it missed a validation crescent even when clicked). Pasting the
cohort's bleeds (image and label) at random head-tissue positions of training crops shows the same densities in
every place, against bone included, the object-level copy-paste of TumorCP (Yang et al., MICCAI 2021) for the
lesion segmentation of small CT cohorts. Nothing is invented: the pasted voxels are the cohort's own blood.

    LesionBank().add_items(cached training items)  one entry per connected hemorrhage of at least MIN_LESION_VOXELS:
                                                   its bounding box (+ a rim), relative to its scan's tissue median
    RandLesionPasted(bank, prob)                   per crop, with ``prob``: one entry, mirrored and turned in-plane at
                                                   random, blended into head tissue (not bone, not air) at a random
                                                   position; the label gets the pasted voxels

The bank is filled after the RAM cache (``data.loaders``), before any DataLoader worker starts, so every worker
holds the same lesions; the transform draws only from its own seeded random state, so crops stay a function of
(seed, epoch, index).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage

logger = logging.getLogger(__name__)

# Bleeds smaller than this (at the training grid, ~0.03 mL at 1.5 mm) are label noise, not lesions worth moving.
MIN_LESION_VOXELS = 8
# Voxels of the source scan kept around each bleed: its partial-volume edge, which the blend needs.
LESION_RIM_VOXELS = 2
# Width (voxels) of the blend between the pasted bleed and the tissue it lands on: a soft edge like the partial
# volume of a real one, so the model cannot learn a pasted bleed by a sharp border.
BLEND_SIGMA_VOXELS = 0.75
# Head tissue a bleed may land on, in head-tissue standard deviations about the scan's tissue median: CSF and brain
# (down to ~ -40 HU in the brain window) up to the bone margin of data.transforms (~ +135 HU). Air, padding and
# bone are never painted, so a bleed placed at the skull is cut by it, the way a real one is.
TISSUE_BELOW_MEDIAN, TISSUE_ABOVE_MEDIAN = 1.0, 1.5
# A bleed lies against bone (a subdural or epidural crescent, a cortical bleed at the inner table) when at least this
# many bone voxels of its box touch it (bone: the tissue band's upper edge, +1.5 head-tissue standard deviations, the
# bone margin of data.transforms); with ``at_bone`` its pastes go against the crop's bone, the touching side facing it.
MIN_CONTACT_VOXELS = 4
# Radius (voxels) of the neighbourhood whose bone voxels say which way the bone lies from a tissue voxel next to it.
BONE_SEARCH_VOXELS = 3
# The crop's image, label and the scan's tissue median (CropIndicesd computes it once per scan in the RAM cache).
TISSUE_MEDIAN_KEY = "tissue_median"


@dataclass(frozen=True)
class Lesion:
    """``image``: the bleed's box in its scan's units minus that scan's tissue median (float32); ``mask``: its
    voxels (bool); ``alpha``: the blend weight (1 on the mask, falling off over ``BLEND_SIGMA_VOXELS``);
    ``contact``: the bone voxels of its box that touch it (bool; none for a bleed inside the brain)."""

    image: np.ndarray
    mask: np.ndarray
    alpha: np.ndarray
    contact: np.ndarray

    @property
    def against_bone(self) -> bool:
        return int(self.contact.sum()) >= MIN_CONTACT_VOXELS


class LesionBank:
    """The training set's hemorrhages, one ``Lesion`` per connected component; filled once (``add_items``)."""

    def __init__(self, intensity_unit: float = 1.0) -> None:
        self.lesions: list[Lesion] = []
        self.intensity_unit = float(intensity_unit)  # one head-tissue standard deviation: where bone begins

    def __len__(self) -> int:
        return len(self.lesions)

    def add_items(self, items: Iterable[Mapping[str, Any]]) -> None:
        """Add the bleeds of cached training items (``image``/``label`` 1×D×H×W and ``tissue_median``)."""
        for item in items:
            label = np.asarray(item["label"])[0] > 0
            if not label.any():
                continue
            image = np.asarray(item["image"], dtype=np.float32)[0]
            median = float(item[TISSUE_MEDIAN_KEY])
            components, _ = ndimage.label(label)
            for index, box in enumerate(ndimage.find_objects(components), start=1):
                mask = components[box] == index
                if int(mask.sum()) < MIN_LESION_VOXELS:
                    continue
                rimmed = tuple(slice(max(0, s.start - LESION_RIM_VOXELS), min(n, s.stop + LESION_RIM_VOXELS))
                               for s, n in zip(box, label.shape))
                mask = components[rimmed] == index
                alpha = np.maximum(mask, ndimage.gaussian_filter(mask.astype(np.float32), BLEND_SIGMA_VOXELS))
                bone = image[rimmed] >= bone_floor(median, self.intensity_unit)
                contact = bone & ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), dtype=bool)) & ~mask
                self.lesions.append(Lesion(image[rimmed] - median, mask, alpha.astype(np.float32), contact))
        logger.info("lesion paste: %d hemorrhages in the bank, %d against bone", len(self.lesions),
                    sum(lesion.against_bone for lesion in self.lesions))


def bone_floor(median: float, intensity_unit: float) -> float:
    """The density where bone begins: ``TISSUE_ABOVE_MEDIAN`` head-tissue standard deviations above the median."""
    return median + TISSUE_ABOVE_MEDIAN * intensity_unit


def tissue_and_bone(data: Mapping[str, Any], image: torch.Tensor, intensity_unit: float
                    ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """A crop's tissue median and its head-tissue and bone masks (S×S×S bool, from ``image`` 1×S×S×S): tissue is
    ``TISSUE_BELOW_MEDIAN``..``TISSUE_ABOVE_MEDIAN`` standard deviations about the scan's tissue median (CropIndicesd
    put it in ``data``; a crop from elsewhere falls back on its own median), bone is everything above that."""
    median = float(data[TISSUE_MEDIAN_KEY]) if TISSUE_MEDIAN_KEY in data else float(torch.median(image))
    floor = bone_floor(median, intensity_unit)
    return median, (image[0] > median - TISSUE_BELOW_MEDIAN * intensity_unit) & (image[0] < floor), image[0] >= floor


def dilated(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """``mask`` (D×H×W, any dtype, any device) grown by ``radius`` voxels along every axis and diagonal (a cube), as
    bool: shifted ORs along one axis at a time, ~1 ms per axis and voxel of radius on a 64³ CPU crop (a stride-1
    max-pool takes 10-40 ms there)."""
    grown = mask.bool()
    for axis in range(3):
        size = grown.shape[axis]
        out = grown.clone()
        for shift in range(1, min(radius, size - 1) + 1):
            out.narrow(axis, shift, size - shift).logical_or_(grown.narrow(axis, 0, size - shift))
            out.narrow(axis, 0, size - shift).logical_or_(grown.narrow(axis, shift, size - shift))
        grown = out
    return grown


def _flipped(arrays: tuple[np.ndarray, ...], axes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    return tuple(np.ascontiguousarray(np.flip(a, axes)) for a in arrays) if axes else arrays


def _oriented(lesion: Lesion, flips: list[bool], swap: tuple[int, int] | None) -> tuple[np.ndarray, ...]:
    arrays = [lesion.image, lesion.mask, lesion.alpha, lesion.contact]
    axes = tuple(axis for axis, flip in enumerate(flips) if flip)
    if axes:
        arrays = [np.flip(a, axes) for a in arrays]
    if swap is not None:
        arrays = [np.swapaxes(a, *swap) for a in arrays]
    return tuple(np.ascontiguousarray(a) for a in arrays)


class RandLesionPasted(RandomizableTransform, MapTransform):
    """With probability ``prob``, paste one bank lesion into the crop (``image``/``label`` 1×S×S×S, numpy or torch
    on any device): mirrored per axis and, about the slice axis, turned by 90° at random (the training grid is
    isotropic, so both are exact); centred on a random head-tissue voxel; painted only where the crop is head tissue
    (``TISSUE_BELOW_MEDIAN``..``TISSUE_ABOVE_MEDIAN``), as the scan's tissue median plus the bleed's own contrast,
    blended at its edge. The label becomes 1 where the painted bleed is; ``ich`` becomes 1. A crop whose scan is
    ICH-negative (``ich`` 0) keeps a drawn paste only with probability ``into_negatives`` (1: always; 0: never).

    With probability ``at_bone``, a bleed that lay against bone in its scan (``Lesion.against_bone``) goes against
    the crop's bone instead of anywhere: its touching side (mirrored to face the bone) on a tissue voxel next to
    bone, so a crescent is seen where crescents are, cut by the inner table (a crop without bone: anywhere)."""

    def __init__(self, bank: LesionBank, prob: float, intensity_unit: float = 1.0,
                 image_key: str = "image", label_key: str = "label", slice_axis_key: str = "slice_axis",
                 into_negatives: float = 1.0, at_bone: float = 0.0):
        MapTransform.__init__(self, [image_key, label_key])
        RandomizableTransform.__init__(self, prob)
        self.bank, self.intensity_unit = bank, intensity_unit
        self.image_key, self.label_key, self.slice_axis_key = image_key, label_key, slice_axis_key
        if not 0.0 <= into_negatives <= 1.0:
            raise ValueError(f"into_negatives must be in [0, 1], got {into_negatives}")
        self.into_negatives = float(into_negatives)
        if not 0.0 <= at_bone <= 1.0:
            raise ValueError(f"at_bone must be in [0, 1], got {at_bone}")
        self.at_bone = float(at_bone)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform or not len(self.bank):
            return d
        if float(d.get("ich", 1.0)) < 0.5 and self.into_negatives < 1.0:
            # No extra draw at 0 (or 1): those settings repeat the earlier on/off option's random stream exactly.
            if self.into_negatives == 0.0 or self.R.rand() >= self.into_negatives:
                return d
        lesion = self.bank.lesions[int(self.R.randint(len(self.bank)))]
        flips = [bool(self.R.rand() < 0.5) for _ in range(3)]
        slice_axis = int(d.get(self.slice_axis_key, 2))
        in_plane = tuple(axis for axis in range(3) if axis != slice_axis)
        swap = in_plane if self.R.rand() < 0.5 else None
        source, mask, alpha, contact = _oriented(lesion, flips, swap)

        image, label = d[self.image_key], d[self.label_key]
        as_tensor = torch.as_tensor(image)
        median, tissue, bone = tissue_and_bone(d, as_tensor, self.intensity_unit)
        centre = None
        # No extra draw when off or for a bleed inside the brain: the earlier recipes' random stream stays.
        if self.at_bone > 0 and lesion.against_bone and self.R.rand() < self.at_bone:
            placed = self._against_bone(tissue, bone, (source, mask, alpha), contact, in_plane)
            if placed is not None:
                centre, (source, mask, alpha) = placed
        if centre is None:
            candidates = torch.nonzero(tissue.flatten()).flatten()
            if candidates.numel() == 0:
                return d
            centre = np.unravel_index(int(candidates[int(self.R.randint(candidates.numel()))]), tissue.shape)

        # The box of the lesion centred on ``centre``, clipped to the crop; ``inner`` indexes the lesion arrays.
        target, inner = [], []
        for c, size, n in zip(centre, mask.shape, tissue.shape):
            start = int(c) - size // 2
            lo, hi = max(0, start), min(n, start + size)
            if hi <= lo:
                return d
            target.append(slice(lo, hi))
            inner.append(slice(lo - start, hi - start))
        target_box, inner_box = tuple(target), tuple(inner)
        device = as_tensor.device
        weight = torch.from_numpy(alpha[inner_box]).to(device) * tissue[target_box]
        painted = torch.from_numpy(mask[inner_box]).to(device) & tissue[target_box]
        if int(painted.sum()) < MIN_LESION_VOXELS:
            return d
        blood = torch.from_numpy(source[inner_box]).to(device) + median

        image = image.clone() if isinstance(image, torch.Tensor) else np.array(image, copy=True)
        label = label.clone() if isinstance(label, torch.Tensor) else np.array(label, copy=True)
        region = torch.as_tensor(image)[0][target_box]
        region.mul_(1 - weight).add_(weight * blood.to(region.dtype))
        label_region = torch.as_tensor(label)[0][target_box]
        label_region[painted] = 1
        d[self.image_key], d[self.label_key] = image, label
        if "ich" in d:
            d["ich"] = 1.0
        return d

    def _against_bone(self, tissue: torch.Tensor, bone: torch.Tensor, arrays: tuple[np.ndarray, ...],
                      contact: np.ndarray, in_plane: tuple[int, int]
                      ) -> tuple[tuple[int, ...], tuple[np.ndarray, ...]] | None:
        """Where the bleed goes against the crop's bone: the box centre that puts its bone contact one voxel past a
        random tissue voxel next to bone, and ``arrays`` (image, mask, alpha) turned about the slice axis and
        mirrored so that its contact faces that bone; None when the crop shows no bone."""
        touching = dilated(bone, 1)
        candidates = torch.nonzero((tissue & touching).flatten()).flatten()
        if candidates.numel() == 0:
            return None
        anchor = np.array(np.unravel_index(int(candidates[int(self.R.randint(candidates.numel()))]), tissue.shape))
        # The way to the bone from the anchor: the mean offset of the bone voxels around it.
        window = tuple(slice(max(0, a - BONE_SEARCH_VOXELS), a + BONE_SEARCH_VOXELS + 1) for a in anchor)
        to_bone = (np.argwhere(bone[window].cpu().numpy()) + [w.start for w in window] - anchor).mean(axis=0)
        to_bone /= max(float(np.linalg.norm(to_bone)), 1e-6)
        # The bleed's way to its bone: turned (in-plane axes exchanged) if that lines it up better, then mirrored
        # along every axis where it points away from the crop's bone.
        mask = arrays[1]
        towards = np.argwhere(contact).mean(axis=0) - np.argwhere(mask).mean(axis=0)
        turned = towards.copy()
        turned[list(in_plane)] = towards[list(in_plane[::-1])]
        if np.abs(turned * to_bone).sum() > np.abs(towards * to_bone).sum():
            arrays = tuple(np.swapaxes(a, *in_plane) for a in arrays)
            contact, towards = np.swapaxes(contact, *in_plane), turned
        flips = tuple(axis for axis in range(3) if towards[axis] * to_bone[axis] < 0)
        arrays, contact = _flipped(arrays, flips), _flipped((contact,), flips)[0]
        target = anchor + to_bone
        centre = tuple(int(round(t - c + size // 2))
                       for t, c, size in zip(target, np.argwhere(contact).mean(axis=0), contact.shape))
        return centre, tuple(np.ascontiguousarray(a) for a in arrays)
