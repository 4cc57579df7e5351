"""Streak artefact augmentation: beam-hardening-like bands added to training crops, the label unchanged.

Head CT shows straight dark and bright bands in the axial plane where dense bone hardens the beam (between the
petrous bones, below the occipital protuberance). A bright band on brain lands in blood's density range, and a
small cohort holds too few of them for a model to learn that a band is not a bleed: in the learning benchmark the
false positives left on ICH-negative scans were such bands (README "What to expect"). This transform puts bands
into the training crops so every few crops show one, labelled as what it is: not hemorrhage. MONAI's artefact
transforms are MR k-space ones (Gibbs ringing, spike noise); CT has none, hence this one.

    RandStreakArtefactd(prob, intensity_unit)   per crop, with ``prob``: 1..MAX_STREAKS straight bands in the plane
                                                of the slice axis, each over a run of adjacent slices, added to head
                                                tissue only (not air, not within 3 voxels of bone, not the
                                                labelled blood and its rim)
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from monai.transforms import MapTransform, RandomizableTransform

from data.lesion_paste import dilated, tissue_and_bone
from data.normalization import HEAD_TISSUE_STD_HU

MAX_STREAKS = 3
# Band contrast in HU, either sign: real beam-hardening streaks run from faint to ~±60 HU; +20 HU on ~30 HU brain
# already reads as blood (50-90 HU).
STREAK_HU = (15.0, 70.0)
# Gaussian cross-section of a band, standard deviation in voxels of the training grid (0.6-3 mm at 1.5 mm).
STREAK_SIGMA_VOXELS = (0.4, 2.0)
# A band runs over this fraction of the crop's slices (at least one slice), each slice at 50-100 % of its contrast.
STREAK_SLICE_RUN = (0.05, 0.5)
# Bands pass within this fraction of the crop side from its centre, so most cross head tissue.
STREAK_OFFSET = 0.4
# Bands stop this many voxels (4.5 mm at 1.5 mm) short of bone: a bright band against the inner table is what a
# subdural crescent looks like, and teaching "bright band = not blood" there cost crescents in the benchmark.
STREAK_BONE_CLEARANCE_VOXELS = 3


class RandStreakArtefactd(RandomizableTransform, MapTransform):
    """With probability ``prob``, add 1..``MAX_STREAKS`` beam-hardening-like bands to the crop's ``image``
    (1×S×S×S, numpy or torch on any device): each a straight line in the plane normal to the slice axis (random
    angle and offset) with a Gaussian cross-section, extruded over a run of adjacent slices, of ±``STREAK_HU``
    contrast (``intensity_unit`` = one head-tissue standard deviation in the image's units, ~60 HU). Painted only on
    head tissue (the band of densities ``data.lesion_paste`` pastes onto, about the scan's tissue median) away from
    the labelled blood (one voxel of margin), so the label stays exactly the blood, and ``STREAK_BONE_CLEARANCE_VOXELS``
    away from bone. The label is not changed."""

    def __init__(self, prob: float, intensity_unit: float = 1.0, image_key: str = "image",
                 label_key: str = "label", slice_axis_key: str = "slice_axis"):
        MapTransform.__init__(self, [image_key, label_key])
        RandomizableTransform.__init__(self, prob)
        self.intensity_unit = float(intensity_unit)
        self.image_key, self.label_key, self.slice_axis_key = image_key, label_key, slice_axis_key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        image = d[self.image_key]
        as_tensor = torch.as_tensor(image)
        shape = as_tensor.shape[1:]
        slice_axis = int(d.get(self.slice_axis_key, 2))
        u_axis, v_axis = (axis for axis in range(3) if axis != slice_axis)
        device = as_tensor.device
        # In-plane coordinates (voxels) about the crop centre, broadcast over the slice axis.
        u = (torch.arange(shape[u_axis], device=device, dtype=torch.float32) - (shape[u_axis] - 1) / 2)
        v = (torch.arange(shape[v_axis], device=device, dtype=torch.float32) - (shape[v_axis] - 1) / 2)
        view_u, view_v, view_k = [1, 1, 1], [1, 1, 1], [1, 1, 1]
        view_u[u_axis], view_v[v_axis], view_k[slice_axis] = -1, -1, -1
        u, v = u.reshape(view_u), v.reshape(view_v)
        n_slices = shape[slice_axis]
        hu_to_units = self.intensity_unit / HEAD_TISSUE_STD_HU

        artefact = torch.zeros(tuple(shape), device=device, dtype=torch.float32)
        for _ in range(int(self.R.randint(1, MAX_STREAKS + 1))):
            angle = self.R.uniform(0.0, math.pi)
            offset = self.R.uniform(-STREAK_OFFSET, STREAK_OFFSET) * min(shape[u_axis], shape[v_axis])
            sigma = self.R.uniform(*STREAK_SIGMA_VOXELS)
            contrast = self.R.uniform(*STREAK_HU) * (1.0 if self.R.rand() < 0.5 else -1.0)
            run = max(1, int(round(self.R.uniform(*STREAK_SLICE_RUN) * n_slices)))
            first = int(self.R.randint(0, max(1, n_slices - run + 1)))
            per_slice = torch.zeros(n_slices, device=device, dtype=torch.float32)
            per_slice[first:first + run] = torch.from_numpy(self.R.uniform(0.5, 1.0, size=run).astype("float32"))
            distance = u * math.cos(angle) + v * math.sin(angle) - offset
            band = torch.exp(-0.5 * (distance / sigma) ** 2)
            artefact += (contrast * hu_to_units) * band * per_slice.reshape(view_k)

        _, tissue, bone = tissue_and_bone(d, as_tensor, self.intensity_unit)
        near_blood = dilated(torch.as_tensor(d[self.label_key]).to(device)[0], 1)
        artefact = artefact * (tissue & ~near_blood & ~dilated(bone, STREAK_BONE_CLEARANCE_VOXELS))

        image = image.clone() if isinstance(image, torch.Tensor) else image.copy()
        torch.as_tensor(image)[0].add_(artefact.to(as_tensor.dtype))
        d[self.image_key] = image
        return d
