"""Synthetic head-CT cohorts in exactly the user format, for tests, benchmarks and the --test self-check.

``generate_cohort`` writes under ``out_dir``::

    images/001.pkl ...   raw HU volumes (int16 or float32) in the pkl layouts users have: {"image", "spacing"},
                         {"img"} without spacing, a bare array, {"ct", "affine"}, {"volume"/"data", ...};
                         ICH-negative scans always carry their spacing (they have no mask header to fall back on)
    masks/001.nii.gz     binary uint8 NIfTI masks whose affine holds the spacing (a few named without leading zeros,
                         e.g. 7.nii.gz for 007.pkl, a few as .nii); no mask file for ICH-negative scans
    train.csv, val.csv   path,ich,patient_id; no patient in both splits, some patients with two scans

Each scan is a phantom in physical units: air (-1000 HU), scalp (~40), a skull ring (dense tables ~1500,
diploe ~800), grey/white matter (~36/27), lateral ventricles (~5), small calcifications, and for ICH-positive
scans one or more hyperdense hemorrhages with a hypodense oedema rim. Geometry follows the spacing (the slice axis
is the one with the largest spacing), so 512×512×30 at 0.45×0.45×5 mm looks like a clinical scan and 96×96×20 at
1.2×1.2×4 mm is a fast test cohort. Everything is deterministic given the seed.

``Appearance`` (one CLI flag per field) sets what makes a cohort hard: which lesion kinds are drawn and how often
(ellipsoid, lobulated or irregular intraparenchymal bleeds, a subdural crescent, intraventricular blood layering
in a lateral ventricle; shapes in ``synthetic_lesions``), how many separate foci, blood density, image noise and
beam-hardening-like streaks. Its defaults — 0.45/0.35/0.2 ellipsoid/lobulated/subdural, two foci in 15 % of
positive scans, blood 60-85 HU, noise σ 4-8 HU, no streaks — reproduce earlier cohorts array for array: options
away from the defaults draw their extra random numbers only where the defaults never go.
"""
from __future__ import annotations

import argparse
import csv
import math
import numbers
import pickle
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from data.io import slice_axis
from synthetic_lesions import CONNECTIVITY, LESION_KINDS, Anatomy, ellipsoid, place_lesion

AIR_HU = -1000.0
SCALP_HU = 40.0
GREY_HU, WHITE_HU = 36.0, 27.0
CSF_HU = 5.0
OEDEMA_HU = 18.0
OUTSIDE_FOV_HU = -2048.0   # what many scanners store outside the reconstruction circle
_MAX_BRAIN_FRACTION = 0.12  # a hemorrhage never takes more than this share of the brain


@dataclass(frozen=True)
class SyntheticCohort:
    train_csv: Path
    val_csv: Path
    mask_dir: Path
    root: Path


@dataclass(frozen=True)
class HeadGeometry:
    """One patient's head in mm, in a frame whose axes are (left-right, front-back, slice) — see _head_frame."""

    semi_axes: tuple[float, float, float]   # outer surface of the scalp
    center: tuple[float, float, float]      # offset from the grid centre
    angle: float                            # in-plane rotation (rad)
    scalp_mm: float
    skull_mm: float
    calcifications: bool


@dataclass(frozen=True)
class SyntheticScan:
    """``image``: D×H×W float32 HU; ``mask``: D×H×W uint8 (1 = hemorrhage); ``blood_ml`` from mask voxels.

    ``lesion_kinds`` has one entry per lesion drawn; ``foci`` counts the connected lesions in the mask
    (26-connectivity; fewer than the lesions drawn when foci touch, see ``Appearance.separate_foci``) and
    ``focus_ml`` gives their volumes, largest first; ``streaks`` is the number of streak artefacts added."""

    image: np.ndarray
    mask: np.ndarray
    lesion_kinds: tuple[str, ...]
    blood_ml: float
    foci: int
    focus_ml: tuple[float, ...]
    streaks: int


def _knob(help: str, default: Any, **flag_options: Any) -> Any:
    """An Appearance field that also carries its CLI flag (``--<field name>``): help text and argparse options."""
    return field(default=default, metadata={"help": help, **flag_options})


@dataclass(frozen=True)
class Appearance:
    """How hemorrhages and artefacts look in a cohort; validated on construction (ValueError naming each bad field).

    The defaults reproduce cohorts made before these options existed, array for array, for a given seed."""

    lesion_kinds: tuple[str, ...] = _knob(
        f"Hemorrhage kinds to draw from: {', '.join(LESION_KINDS)}.", ("ellipsoid", "lobulated", "subdural"),
        nargs="+", choices=LESION_KINDS, metavar="KIND")
    kind_weights: tuple[float, ...] = _knob(
        "Relative frequency of each of --lesion_kinds, in the same order (equal weights when only --lesion_kinds "
        "is given).", (0.45, 0.35, 0.2), nargs="+", type=float, metavar="W")
    max_foci: int = _knob("Most hemorrhage foci in a multifocal scan (1: never multifocal).", 2, type=int)
    multifocal_fraction: float = _knob(
        "Fraction of ICH-positive scans with 2..max_foci foci; the total volume stays within --min_ml..--max_ml.",
        0.15, type=float)
    separate_foci: bool = _knob(
        "Keep foci at least one voxel apart so each is its own connected lesion (off, as in earlier cohorts, they "
        "may touch and merge).", False, action=argparse.BooleanOptionalAction)
    blood_hu: tuple[float, float] = _knob(
        "Range of the mean blood density per lesion in HU (e.g. 50 65 for low-contrast subacute or anaemic bleeds).",
        (60.0, 85.0), nargs=2, type=float, metavar=("LOW", "HIGH"))
    noise_hu: tuple[float, float] = _knob("Range of the image noise standard deviation per scan in HU.",
                                          (4.0, 8.0), nargs=2, type=float, metavar=("LOW", "HIGH"))
    streak_fraction: float = _knob(
        "Fraction of scans with beam-hardening-like dark and bright streaks across the head in the lower slices; "
        "they never touch the hemorrhage.", 0.0, type=float)

    def __post_init__(self) -> None:
        # Accept any sequences (lists from argparse or JSON) but store tuples, so equal settings compare equal.
        for name in ("lesion_kinds", "kind_weights", "blood_hu", "noise_hu"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        kinds, weights = self.lesion_kinds, self.kind_weights
        unknown = [k for k in kinds if k not in LESION_KINDS]
        if not kinds or unknown or len(set(kinds)) != len(kinds):
            problems.append(f"lesion_kinds must be distinct names from {', '.join(LESION_KINDS)}, got {kinds}")
        if len(weights) != len(kinds):
            problems.append(f"kind_weights needs one weight per lesion kind: {len(weights)} weight(s) {weights} for "
                            f"{len(kinds)} kind(s) {kinds}")
        elif not all(math.isfinite(x) and x >= 0 for x in weights) or sum(weights) <= 0:
            problems.append(f"kind_weights must be >= 0 with a positive sum, got {weights}")
        if isinstance(self.max_foci, bool) or not isinstance(self.max_foci, numbers.Integral) or self.max_foci < 1:
            problems.append(f"max_foci must be an integer >= 1, got {self.max_foci!r}")
        for name in ("multifocal_fraction", "streak_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name, floor in (("blood_hu", -math.inf), ("noise_hu", 0.0)):
            low_high = getattr(self, name)
            finite_pair = len(low_high) == 2 and all(math.isfinite(x) for x in low_high)
            if not (finite_pair and floor <= low_high[0] <= low_high[1]):
                bound = "0 <= " if floor == 0.0 else ""
                problems.append(f"{name} must be two finite values {bound}LOW <= HIGH in HU, got {low_high}")
        if problems:
            raise ValueError("invalid synthetic appearance:\n" + "\n".join(f"  - {p}" for p in problems))

    @property
    def kind_probabilities(self) -> tuple[float, ...]:
        total = sum(self.kind_weights)
        return tuple(w / total for w in self.kind_weights)


def random_head(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator) -> HeadGeometry:
    """A plausible adult head that fits the field of view (scaled down for small test grids)."""
    k = slice_axis(spacing)
    a, b = [i for i in range(3) if i != k]
    extent = [n * s for n, s in zip(shape, spacing)]
    jitter = rng.uniform(0.95, 1.05, size=3)
    semi = (min(72.0, 0.40 * extent[a]) * jitter[0], min(92.0, 0.44 * extent[b]) * jitter[1],
            0.62 * extent[k] * jitter[2])
    # Shift the head down the slice axis so the vertex lies inside the scan and the skull base is cut off.
    center = (rng.uniform(-3, 3), rng.uniform(-3, 3), -0.14 * extent[k])
    return HeadGeometry(semi_axes=tuple(float(s) for s in semi), center=tuple(float(c) for c in center),
                        angle=float(rng.uniform(-0.15, 0.15)), scalp_mm=float(rng.uniform(3.0, 5.0)),
                        skull_mm=float(rng.uniform(6.0, 8.0)), calcifications=bool(rng.random() < 0.7))


def _head_frame(shape: Sequence[int], spacing: Sequence[float], head: HeadGeometry
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, w) head-frame coordinates in mm of every voxel centre, broadcastable to ``shape``."""
    k = slice_axis(spacing)
    a, b = [i for i in range(3) if i != k]
    coords = []
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        view = [1, 1, 1]
        view[axis] = n
        coords.append(((np.arange(n, dtype=np.float32) + 0.5 - n / 2.0) * s).reshape(view))
    cos, sin = math.cos(head.angle), math.sin(head.angle)
    x, y, z = coords[a] - head.center[0], coords[b] - head.center[1], coords[k] - head.center[2]
    return x * cos + y * sin, -x * sin + y * cos, z


def _foci_count(rng: np.random.Generator, appearance: Appearance) -> int:
    """1, or with probability ``multifocal_fraction`` between 2 and ``max_foci``."""
    if rng.random() >= appearance.multifocal_fraction or appearance.max_foci == 1:
        return 1
    # The original generator knew only two foci: no extra draw when that is the most allowed.
    return 2 if appearance.max_foci == 2 else int(rng.integers(2, appearance.max_foci + 1))


def _add_streaks(image: np.ndarray, rng: np.random.Generator, frame: tuple[np.ndarray, np.ndarray, np.ndarray],
                 head: np.ndarray, blood: np.ndarray, spacing: Sequence[float], reach_mm: float) -> int:
    """Add 2-5 beam-hardening-like streaks to ``image`` in place; returns how many.

    Each is a straight band across the axial plane (Gaussian profile 0.7-3 mm wide, ±15-60 HU, mostly dark, as
    between the petrous bones) in a run of adjacent slices in the lower half of the scan, where the dense skull base
    is. They stop at the scalp and spare the blood plus a one-voxel margin, so the mask stays exactly the blood."""
    u, v, _ = frame
    k = slice_axis(spacing)
    n_slices = image.shape[k]
    view = [1, 1, 1]
    view[k] = n_slices
    artefact = np.zeros(image.shape, dtype=np.float32)
    n_streaks = int(rng.integers(2, 6))
    for _ in range(n_streaks):
        angle = rng.uniform(0.0, math.pi)
        offset_mm = rng.uniform(-0.6, 0.6) * reach_mm
        width_mm = rng.uniform(0.7, 3.0)
        amplitude = rng.uniform(15.0, 60.0) * (-1.0 if rng.random() < 0.6 else 1.0)
        first = int(rng.integers(max(1, n_slices // 2)))
        last = min(n_slices, first + int(rng.integers(1, max(2, n_slices // 3) + 1)))
        per_slice = np.zeros(n_slices, dtype=np.float32)
        per_slice[first:last] = rng.uniform(0.5, 1.0, size=last - first)   # streaks vary from slice to slice
        distance = u * math.cos(angle) + v * math.sin(angle) - offset_mm
        band = np.exp(-0.5 * (distance / width_mm) ** 2).astype(np.float32)
        artefact += amplitude * band * per_slice.reshape(view)
    artefact[~head | ndimage.binary_dilation(blood, structure=CONNECTIVITY)] = 0.0
    image += artefact
    return n_streaks


def synthesize_scan(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator,
                    with_hemorrhage: bool, head: HeadGeometry | None = None, min_ml: float = 5.0,
                    max_ml: float = 40.0, appearance: Appearance | None = None) -> SyntheticScan:
    """One head CT in HU with its hemorrhage mask (empty when ``with_hemorrhage`` is False).

    Hemorrhage volume (all foci together) is drawn log-uniformly in [min_ml, max_ml] (capped at 12 % of the brain)
    and realised to within about 10 %; ``appearance`` (default: ``Appearance()``) sets lesion kinds, foci, blood
    density, noise and streaks. Raises ValueError when the grid is too small to hold ``min_ml`` of blood."""
    appearance = appearance if appearance is not None else Appearance()
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 4 or min(spacing) <= 0:
        raise ValueError(f"need 3 sizes >= 4 and 3 positive spacings, got shape {shape}, spacing {spacing}")
    head = head or random_head(shape, spacing, rng)
    frame = _head_frame(shape, spacing, head)
    u, v, w = frame
    semi = head.semi_axes
    r = np.sqrt((u / semi[0]) ** 2 + (v / semi[1]) ** 2 + (w / semi[2]) ** 2).astype(np.float32)
    mean_semi = (semi[0] + semi[1]) / 2.0
    skull_outer = 1.0 - head.scalp_mm / mean_semi
    skull_inner = skull_outer - head.skull_mm / mean_semi
    brain_r = r / skull_inner           # 1.0 at the inner table
    brain = brain_r < 1.0
    voxel_ml = float(np.prod(spacing)) / 1000.0

    image = np.full(shape, AIR_HU, dtype=np.float32)
    image[r < 1.0] = SCALP_HU
    bone = (r >= skull_inner) & (r < skull_outer)
    # Dense outer and inner tables, softer diploe in between.
    depth = np.abs(2.0 * (r[bone] - skull_inner) / (skull_outer - skull_inner) - 1.0)
    image[bone] = 800.0 + 750.0 * depth ** 2
    image[brain] = WHITE_HU
    image[brain & (brain_r > 1.0 - 4.0 / mean_semi)] = GREY_HU   # ~4 mm cortical ribbon
    bs = [s * skull_inner for s in semi]  # brain semi-axes
    ventricle_semi = (0.07 * bs[0], 0.30 * bs[1], 0.18 * bs[2])   # lateral ventricles, left and right
    ventricle_centers = ((0.16 * bs[0], -0.02 * bs[1], 0.12 * bs[2]), (-0.16 * bs[0], -0.02 * bs[1], 0.12 * bs[2]))
    ventricles = brain & (ellipsoid(u, v, w, ventricle_centers[0], ventricle_semi)
                          | ellipsoid(u, v, w, ventricle_centers[1], ventricle_semi))
    image[ventricles] = CSF_HU
    if head.calcifications:  # pineal gland and choroid plexus: small hyperdense spots that are not blood
        image[ellipsoid(u, v, w, (0.0, -0.25 * bs[1], 0.05 * bs[2]), (2.5, 2.5, 2.5)) & brain] = 180.0
        image[ellipsoid(u, v, w, (0.16 * bs[0], -0.2 * bs[1], 0.12 * bs[2]), (2.0, 2.0, 2.0)) & brain] = 110.0

    mask = np.zeros(shape, dtype=bool)
    kinds: list[str] = []
    if with_hemorrhage:
        brain_ml = float(np.count_nonzero(brain)) * voxel_ml
        cap = min(max_ml, _MAX_BRAIN_FRACTION * brain_ml)
        if cap < min_ml:
            raise ValueError(f"grid {shape} at {spacing} mm holds only {brain_ml:.0f} mL of brain: too small for a "
                             f"{min_ml:g} mL hemorrhage (use a larger shape or spacing, or a smaller min_ml)")
        # -v is posterior (the pineal and choroid plexus sit there), so a supine patient's gravity is along -v in the
        # scanner frame: "up" is +v turned back by the head's in-plane tilt.
        anatomy = Anatomy(frame=frame, brain=brain, brain_r=brain_r, brain_semi_mm=(bs[0] + bs[1]) / 2.0,
                          eligible=brain & (brain_r < 0.6) & ~ventricles,
                          ventricles=tuple((c, ventricle_semi) for c in ventricle_centers),
                          up=(math.sin(head.angle), math.cos(head.angle), 0.0), shape=shape, spacing=spacing)
        n_lesions = _foci_count(rng, appearance)
        for _ in range(n_lesions):
            kind = str(rng.choice(appearance.lesion_kinds, p=appearance.kind_probabilities))
            target = max(math.exp(rng.uniform(math.log(min_ml), math.log(cap))), min_ml) / n_lesions
            region, drawn, region_of, scale = place_lesion(kind, target, rng, anatomy, mask, voxel_ml,
                                                            appearance.separate_foci)
            if drawn not in ("subdural", "intraventricular"):   # oedema surrounds bleeds into brain tissue only
                oedema = region_of(scale, 3.0) & brain & ~region & ~mask
                image[oedema] = OEDEMA_HU
            image[region] = rng.uniform(*appearance.blood_hu) + rng.normal(0.0, 3.0, size=int(np.count_nonzero(region)))
            mask |= region
            kinds.append(drawn)

    # Partial volume along the finer axes (~0.5 mm point-spread), then quantum noise.
    sigma = [min(1.0, 0.5 / s) for s in spacing]
    image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    image += rng.normal(0.0, rng.uniform(*appearance.noise_hu), size=shape).astype(np.float32)
    k = slice_axis(spacing)
    a, b = [i for i in range(3) if i != k]
    fov_radius = min(shape[a] * spacing[a], shape[b] * spacing[b]) / 2.0
    if rng.random() < 0.35 and fov_radius > max(semi[0], semi[1]) + 5.0:
        # Outside the reconstruction circle scanners store a padding value well below air.
        coords = [((np.arange(n) + 0.5 - n / 2.0) * s) for n, s in zip(shape, spacing)]
        radius = np.sqrt(coords[a][:, None] ** 2 + coords[b][None, :] ** 2)
        outside = np.expand_dims(radius > fov_radius, axis=k)
        image = np.where(outside, np.float32(OUTSIDE_FOV_HU), image)
    image = image.astype(np.float32)
    streaks = 0
    # Last, and only when asked for: the rest of the scan is the same with or without streaks.
    if appearance.streak_fraction > 0 and rng.random() < appearance.streak_fraction:
        streaks = _add_streaks(image, rng, frame, r < 1.0, mask, spacing, min(semi[0], semi[1]))
    labels, foci = ndimage.label(mask, structure=CONNECTIVITY)
    focus_ml = sorted((float(n) * voxel_ml for n in np.bincount(labels.ravel())[1:]), reverse=True)
    blood = mask.astype(np.uint8)
    return SyntheticScan(image=image, mask=blood, lesion_kinds=tuple(kinds), blood_ml=float(blood.sum()) * voxel_ml,
                         foci=int(foci), focus_ml=tuple(focus_ml), streaks=streaks)


def scan_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """The voxel-to-world affine of a synthetic scan and of its mask (the same grid): axis-aligned, centred on the
    volume, as a scanner's would be."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n * s) / 2.0 for n, s in zip(shape, spacing)]
    return affine


def _pkl_payload(image: np.ndarray, spacing: Sequence[float], positive: bool, rng: np.random.Generator) -> object:
    """One of the pkl layouts users produce. ICH-negative scans have no mask, so they always carry spacing."""
    affine = scan_affine(image.shape, spacing)
    layouts = ["image+spacing", "img", "bare", "ct+affine"] if positive else ["image+spacing", "volume+spacing",
                                                                             "data+affine"]
    layout = layouts[int(rng.integers(len(layouts)))]
    if layout == "image+spacing":
        return {"image": image, "spacing": tuple(float(s) for s in spacing)}
    if layout == "volume+spacing":
        return {"volume": image, "spacing": np.asarray(spacing, dtype=np.float64)}
    if layout == "img":
        return {"img": image}
    if layout == "ct+affine":
        return {"ct": image, "affine": affine}
    if layout == "data+affine":
        return {"data": image, "affine": affine}
    return image


def _split_plan(n: int, positive_fraction: float, rng: np.random.Generator, force_pair: bool
                ) -> tuple[list[bool], list[int]]:
    """Positive flags and a patient index per scan (some patients get two consecutive scans)."""
    n_positive = int(round(n * positive_fraction))
    if n >= 1 and positive_fraction > 0:
        n_positive = max(n_positive, 1)
    if n >= 2 and positive_fraction < 1:
        n_positive = min(n_positive, n - 1)
    flags = [False] * n
    for i in rng.permutation(n)[:n_positive]:
        flags[int(i)] = True
    patients: list[int] = []
    patient = -1
    while len(patients) < n:
        patient += 1
        pair = len(patients) + 2 <= n and ((force_pair and patient == 0) or rng.random() < 0.25)
        patients += [patient] * (2 if pair else 1)
    return flags, patients


def generate_cohort(out_dir: str | Path, n_train: int, n_val: int, shape: Sequence[int] = (512, 512, 30),
                    spacing: Sequence[float] = (0.45, 0.45, 5.0), seed: int = 0, positive_fraction: float = 0.6,
                    relative_paths: bool = False, min_ml: float = 5.0, max_ml: float = 40.0,
                    appearance: Appearance | None = None) -> SyntheticCohort:
    """Write a synthetic cohort in the user format (see the module docstring) and return its paths.

    Scans are numbered 001, 002, ... (train first); patients P0001, ... never cross splits. With
    ``relative_paths`` the CSVs hold paths relative to their own folder. ``appearance`` (default:
    ``Appearance()``) applies to every scan. Deterministic given ``seed``.
    """
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0, got {n_train} and {n_val}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    root = Path(out_dir)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    plan_rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    number, patient_offset = 0, 0
    csv_paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        flags, patients = _split_plan(n, positive_fraction, plan_rng, force_pair=(split == "train" and n >= 3))
        rows = []
        for positive, patient in zip(flags, patients):
            number += 1
            patient_id = patient + patient_offset + 1
            # Head anatomy is a property of the patient; noise, lesions and file layout of the scan.
            head = random_head(shape, spacing, np.random.default_rng(np.random.SeedSequence([seed, 1, patient_id])))
            rng = np.random.default_rng(np.random.SeedSequence([seed, 2, number]))
            scan = synthesize_scan(shape, spacing, rng, positive, head=head, min_ml=min_ml, max_ml=max_ml,
                                   appearance=appearance)
            image = np.rint(scan.image).astype(np.int16) if rng.random() < 0.5 else scan.image
            image_path = images / f"{number:03d}.pkl"
            protocol = int(rng.choice([2, 4, 5], p=[0.15, 0.45, 0.4]))
            with open(image_path, "wb") as handle:
                pickle.dump(_pkl_payload(image, spacing, positive, rng), handle, protocol=protocol)
            if positive:
                stem = f"{number}" if rng.random() < 0.2 else f"{number:03d}"
                suffix = ".nii" if rng.random() < 0.25 else ".nii.gz"
                affine = scan_affine(shape, spacing)
                nifti = nib.Nifti1Image(scan.mask, affine)
                nifti.header.set_qform(affine, code=1)
                nifti.header.set_sform(affine, code=1)
                nib.save(nifti, masks / f"{stem}{suffix}")
            shown = image_path.relative_to(root) if relative_paths else image_path.resolve()
            rows.append((str(shown), int(positive), f"P{patient_id:04d}"))
        patient_offset += (max(patients) + 1) if patients else 0
        csv_path = root / f"{split}.csv"
        with open(csv_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "ich", "patient_id"])
            writer.writerows(rows)
        csv_paths[split] = csv_path
    return SyntheticCohort(train_csv=csv_paths["train"], val_csv=csv_paths["val"], mask_dir=masks, root=root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a synthetic head-CT hemorrhage cohort in the ichseg user "
                                                 "format (pkl volumes in HU, NIfTI masks, train/val CSVs).")
    parser.add_argument("--out_dir", required=True, help="Folder to write images/, masks/, train.csv, val.csv into.")
    parser.add_argument("--n_train", type=int, default=8, help="Training scans (default: 8).")
    parser.add_argument("--n_val", type=int, default=4, help="Validation scans (default: 4).")
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 30), metavar="N",
                        help="Volume size in array order (default: 512 512 30).")
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.45, 0.45, 5.0), metavar="MM",
                        help="Voxel spacing in mm, array order; the largest is the slice axis (default: 0.45 0.45 5).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (default: 0).")
    parser.add_argument("--positive_fraction", type=float, default=0.6,
                        help="Fraction of ICH-positive scans per split (default: 0.6).")
    parser.add_argument("--min_ml", type=float, default=5.0,
                        help="Smallest total hemorrhage volume per scan in mL (default: 5).")
    parser.add_argument("--max_ml", type=float, default=40.0,
                        help="Largest total hemorrhage volume per scan in mL (default: 40).")
    parser.add_argument("--relative_paths", action="store_true",
                        help="Write CSV paths relative to the CSV's folder instead of absolute paths.")
    group = parser.add_argument_group("lesions and artefacts", "The defaults reproduce cohorts made before these "
                                                               "flags existed, array for array.")
    for knob in fields(Appearance):
        options = {key: value for key, value in knob.metadata.items() if key != "help"}
        default = knob.default
        shown = " ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in np.atleast_1d(default).tolist())
        if isinstance(default, bool):
            shown = "on" if default else "off"
        # None marks "not given", so appearance_from_args can tell defaults from choices.
        group.add_argument(f"--{knob.name}", default=None, help=f"{knob.metadata['help']} (default: {shown})",
                           **options)
    return parser


def appearance_from_args(args: argparse.Namespace) -> Appearance:
    """The Appearance the lesion/artefact flags ask for; --lesion_kinds alone means equal weights."""
    given = {knob.name: getattr(args, knob.name) for knob in fields(Appearance)
             if getattr(args, knob.name) is not None}
    if "lesion_kinds" in given and "kind_weights" not in given:
        given["kind_weights"] = (1.0,) * len(given["lesion_kinds"])
    return Appearance(**given)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        appearance = appearance_from_args(args)
    except ValueError as error:
        parser.error(str(error))   # exits with status 2 and the usage line, like any other bad flag
    cohort = generate_cohort(args.out_dir, args.n_train, args.n_val, shape=args.shape, spacing=args.spacing,
                             seed=args.seed, positive_fraction=args.positive_fraction,
                             relative_paths=args.relative_paths, min_ml=args.min_ml, max_ml=args.max_ml,
                             appearance=appearance)
    print(f"wrote {args.n_train} train + {args.n_val} val scans of {tuple(args.shape)} at {tuple(args.spacing)} mm\n"
          f"  train CSV: {cohort.train_csv}\n  val CSV:   {cohort.val_csv}\n  masks:     {cohort.mask_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
