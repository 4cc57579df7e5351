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
scans one or two hyperdense hemorrhages (60-85 HU) with a hypodense oedema rim: ellipsoid or lobulated
intraparenchymal bleeds, or a subdural crescent under the skull. Geometry follows the spacing (the slice axis is
the one with the largest spacing), so 512×512×30 at 0.45×0.45×5 mm looks like a clinical scan and 96×96×20 at
1.2×1.2×4 mm is a fast test cohort. Everything is deterministic given the seed.
"""
from __future__ import annotations

import argparse
import csv
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

AIR_HU = -1000.0
SCALP_HU = 40.0
GREY_HU, WHITE_HU = 36.0, 27.0
CSF_HU = 5.0
BLOOD_HU_RANGE = (60.0, 85.0)
OEDEMA_HU = 18.0
OUTSIDE_FOV_HU = -2048.0   # what many scanners store outside the reconstruction circle
LESION_KINDS = ("ellipsoid", "lobulated", "subdural")
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
    """``image``: D×H×W float32 HU; ``mask``: D×H×W uint8 (1 = hemorrhage); ``blood_ml`` from mask voxels."""

    image: np.ndarray
    mask: np.ndarray
    lesion_kinds: tuple[str, ...]
    blood_ml: float


def _slice_axis(spacing: Sequence[float]) -> int:
    """The axis with the largest spacing (the last such axis on ties) is the slice axis."""
    spacing = list(spacing)
    return len(spacing) - 1 - int(np.argmax(spacing[::-1]))


def random_head(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator) -> HeadGeometry:
    """A plausible adult head that fits the field of view (scaled down for small test grids)."""
    k = _slice_axis(spacing)
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
    k = _slice_axis(spacing)
    a, b = [i for i in range(3) if i != k]
    coords = []
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        view = [1, 1, 1]
        view[axis] = n
        coords.append(((np.arange(n, dtype=np.float32) + 0.5 - n / 2.0) * s).reshape(view))
    cos, sin = math.cos(head.angle), math.sin(head.angle)
    x, y, z = coords[a] - head.center[0], coords[b] - head.center[1], coords[k] - head.center[2]
    return x * cos + y * sin, -x * sin + y * cos, z


def _ellipsoid(u: np.ndarray, v: np.ndarray, w: np.ndarray, center: Sequence[float],
               semi: Sequence[float]) -> np.ndarray:
    return (((u - center[0]) / semi[0]) ** 2 + ((v - center[1]) / semi[1]) ** 2
            + ((w - center[2]) / semi[2]) ** 2) < 1.0


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _box(shape: Sequence[int], spacing: Sequence[float], center: Sequence[int], half_mm: float
         ) -> tuple[slice, ...]:
    return tuple(slice(max(0, c - int(math.ceil(half_mm / s)) - 1), min(n, c + int(math.ceil(half_mm / s)) + 2))
                 for c, s, n in zip(center, spacing, shape))


def _lesion_region(kind: str, rng: np.random.Generator, frame: tuple[np.ndarray, np.ndarray, np.ndarray],
                   brain_r: np.ndarray, brain_semi_mm: float, eligible: np.ndarray, shape: tuple[int, ...],
                   spacing: Sequence[float]) -> Callable[[float, float], np.ndarray]:
    """A lesion as ``region(scale, grow_mm) -> D×H×W bool``: blobs have radius ~``scale`` mm (volume ~ scale³),
    the subdural crescent spans a sector of half-angle ``scale`` rad; ``grow_mm`` inflates it (oedema rim)."""
    u, v, w = frame
    if kind == "subdural":
        # A crescent 6-12 mm thick under the inner table; ``scale`` is the half-angle (rad) of the convexity
        # sector it covers, so its volume grows roughly with scale².
        theta = rng.uniform(0.0, 2 * math.pi)
        direction = np.array([math.cos(theta), math.sin(theta), rng.uniform(-0.3, 0.3)])
        direction /= np.linalg.norm(direction)
        cosine = (u * direction[0] + v * direction[1] + w * direction[2]) / (np.sqrt(u ** 2 + v ** 2 + w ** 2) + 1e-6)
        thickness_mm = rng.uniform(6.0, 12.0)

        def crescent(scale: float, grow_mm: float) -> np.ndarray:
            depth = (thickness_mm + grow_mm) / brain_semi_mm
            return (cosine > math.cos(min(scale, 1.3))) & (brain_r >= 1.0 - depth) & (brain_r < 1.0)

        return crescent

    # Blobs: centred on a random eligible voxel (deep in the brain, outside the ventricles), randomly oriented,
    # evaluated only inside a bounding box around the centre.
    candidates = np.flatnonzero(eligible)
    center_index = [int(i) for i in np.unravel_index(candidates[rng.integers(candidates.size)], shape)]
    center = [float(np.broadcast_to(q, shape)[tuple(center_index)]) for q in frame]
    rotation = _random_rotation(rng)

    def local(half_mm: float) -> tuple[tuple[slice, ...], list[np.ndarray]]:
        window = _box(shape, spacing, center_index, half_mm)
        d = [np.broadcast_to(q, shape)[window] - c for q, c in zip(frame, center)]
        return window, [rotation[0, i] * d[0] + rotation[1, i] * d[1] + rotation[2, i] * d[2] for i in range(3)]

    if kind == "ellipsoid":
        aspect = rng.uniform(0.75, 1.3, size=3)
        aspect /= aspect.prod() ** (1 / 3)

        def ellipsoid(scale: float, grow_mm: float) -> np.ndarray:
            semi = [scale * a + grow_mm for a in aspect]
            window, p = local(max(semi))
            region = np.zeros(shape, dtype=bool)
            region[window] = _ellipsoid(p[0], p[1], p[2], (0.0, 0.0, 0.0), semi)
            return region

        return ellipsoid
    n_lobes = int(rng.integers(3, 7))
    offsets = rng.normal(size=(n_lobes, 3))
    offsets *= (rng.uniform(0.3, 0.7, size=n_lobes) / np.linalg.norm(offsets, axis=1))[:, None]
    radii = rng.uniform(0.5, 0.8, size=n_lobes)

    def lobulated(scale: float, grow_mm: float) -> np.ndarray:
        window, p = local(scale * 1.5 + grow_mm)
        inside = np.zeros(p[0].shape, dtype=bool)
        for offset, radius in zip(offsets, radii):
            r = radius * scale + grow_mm
            inside |= _ellipsoid(p[0], p[1], p[2], offset * scale, (r, r, r))
        region = np.zeros(shape, dtype=bool)
        region[window] = inside
        return region

    return lobulated


def _fit_volume(region_of: Callable[[float, float], np.ndarray], scale: float, exponent: float, target_ml: float,
                voxel_ml: float, allowed: np.ndarray) -> tuple[np.ndarray, float]:
    """Rescale a lesion until its volume inside ``allowed`` is within 10 % of ``target_ml`` (at most 8 tries)."""
    region = region_of(scale, 0.0) & allowed
    for _ in range(8):
        realised = float(np.count_nonzero(region)) * voxel_ml
        if abs(realised - target_ml) <= 0.1 * target_ml:
            break
        scale *= (target_ml / max(realised, 0.05 * target_ml)) ** (1.0 / exponent)
        region = region_of(scale, 0.0) & allowed
    return region, scale


def synthesize_scan(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator,
                    with_hemorrhage: bool, head: HeadGeometry | None = None, min_ml: float = 5.0,
                    max_ml: float = 40.0) -> SyntheticScan:
    """One head CT in HU with its hemorrhage mask (empty when ``with_hemorrhage`` is False).

    Hemorrhage volume is drawn log-uniformly in [min_ml, max_ml] (capped at 12 % of the brain) and realised to
    within a few percent; raises ValueError when the grid is too small to hold ``min_ml`` of blood."""
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
    brain_semi_mm = (bs[0] + bs[1]) / 2.0
    ventricle_semi = (0.07 * bs[0], 0.30 * bs[1], 0.18 * bs[2])   # lateral ventricles, left and right
    ventricles = brain & (_ellipsoid(u, v, w, (0.16 * bs[0], -0.02 * bs[1], 0.12 * bs[2]), ventricle_semi)
                          | _ellipsoid(u, v, w, (-0.16 * bs[0], -0.02 * bs[1], 0.12 * bs[2]), ventricle_semi))
    image[ventricles] = CSF_HU
    if head.calcifications:  # pineal gland and choroid plexus: small hyperdense spots that are not blood
        image[_ellipsoid(u, v, w, (0.0, -0.25 * bs[1], 0.05 * bs[2]), (2.5, 2.5, 2.5)) & brain] = 180.0
        image[_ellipsoid(u, v, w, (0.16 * bs[0], -0.2 * bs[1], 0.12 * bs[2]), (2.0, 2.0, 2.0)) & brain] = 110.0

    mask = np.zeros(shape, dtype=bool)
    kinds: list[str] = []
    if with_hemorrhage:
        brain_ml = float(np.count_nonzero(brain)) * voxel_ml
        cap = min(max_ml, _MAX_BRAIN_FRACTION * brain_ml)
        if cap < min_ml:
            raise ValueError(f"grid {shape} at {spacing} mm holds only {brain_ml:.0f} mL of brain: too small for a "
                             f"{min_ml:g} mL hemorrhage (use a larger shape or spacing, or a smaller min_ml)")
        eligible = brain & (brain_r < 0.6) & ~ventricles
        n_lesions = 2 if rng.random() < 0.15 else 1
        for _ in range(n_lesions):
            kind = str(rng.choice(LESION_KINDS, p=(0.45, 0.35, 0.2)))
            target = max(math.exp(rng.uniform(math.log(min_ml), math.log(cap))), min_ml) / n_lesions
            for attempt_kind in (kind, "ellipsoid"):  # a crescent that cannot reach its volume becomes a blob
                region_of = _lesion_region(attempt_kind, rng, frame, brain_r, brain_semi_mm, eligible, shape,
                                           spacing)
                if attempt_kind == "subdural":
                    region, scale = _fit_volume(region_of, 0.5, 2.0, target, voxel_ml, brain & ~mask)
                else:
                    radius = (3.0 * target * 1000.0 / (4.0 * math.pi)) ** (1 / 3)
                    region, scale = _fit_volume(region_of, radius, 3.0, target, voxel_ml, brain & ~mask)
                if np.count_nonzero(region) * voxel_ml >= 0.9 * target:
                    break
            if attempt_kind != "subdural":
                oedema = region_of(scale, 3.0) & brain & ~region & ~mask
                image[oedema] = OEDEMA_HU
            image[region] = rng.uniform(*BLOOD_HU_RANGE) + rng.normal(0.0, 3.0, size=int(np.count_nonzero(region)))
            mask |= region
            kinds.append(attempt_kind)

    # Partial volume along the finer axes (~0.5 mm point-spread), then quantum noise.
    sigma = [min(1.0, 0.5 / s) for s in spacing]
    image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    image += rng.normal(0.0, rng.uniform(4.0, 8.0), size=shape).astype(np.float32)
    k = _slice_axis(spacing)
    a, b = [i for i in range(3) if i != k]
    fov_radius = min(shape[a] * spacing[a], shape[b] * spacing[b]) / 2.0
    if rng.random() < 0.35 and fov_radius > max(semi[0], semi[1]) + 5.0:
        # Outside the reconstruction circle scanners store a padding value well below air.
        coords = [((np.arange(n) + 0.5 - n / 2.0) * s) for n, s in zip(shape, spacing)]
        radius = np.sqrt(coords[a][:, None] ** 2 + coords[b][None, :] ** 2)
        outside = np.expand_dims(radius > fov_radius, axis=k)
        image = np.where(outside, np.float32(OUTSIDE_FOV_HU), image)
    blood = mask.astype(np.uint8)
    return SyntheticScan(image=image.astype(np.float32), mask=blood, lesion_kinds=tuple(kinds),
                         blood_ml=float(blood.sum()) * voxel_ml)


def _pkl_payload(image: np.ndarray, spacing: Sequence[float], positive: bool, rng: np.random.Generator) -> object:
    """One of the pkl layouts users produce. ICH-negative scans have no mask, so they always carry spacing."""
    affine = np.diag([*spacing, 1.0])
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
                    relative_paths: bool = False, min_ml: float = 5.0, max_ml: float = 40.0) -> SyntheticCohort:
    """Write a synthetic cohort in the user format (see the module docstring) and return its paths.

    Scans are numbered 001, 002, ... (train first); patients P0001, ... never cross splits. With
    ``relative_paths`` the CSVs hold paths relative to their own folder. Deterministic given ``seed``.
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
            scan = synthesize_scan(shape, spacing, rng, positive, head=head, min_ml=min_ml, max_ml=max_ml)
            image = np.rint(scan.image).astype(np.int16) if rng.random() < 0.5 else scan.image
            image_path = images / f"{number:03d}.pkl"
            protocol = int(rng.choice([2, 4, 5], p=[0.15, 0.45, 0.4]))
            with open(image_path, "wb") as handle:
                pickle.dump(_pkl_payload(image, spacing, positive, rng), handle, protocol=protocol)
            if positive:
                stem = f"{number}" if rng.random() < 0.2 else f"{number:03d}"
                suffix = ".nii" if rng.random() < 0.25 else ".nii.gz"
                affine = np.diag([*spacing, 1.0])
                affine[:3, 3] = [-(n_ * s) / 2.0 for n_, s in zip(shape, spacing)]
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


def main(argv: Sequence[str] | None = None) -> int:
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
    parser.add_argument("--min_ml", type=float, default=5.0, help="Smallest hemorrhage volume in mL (default: 5).")
    parser.add_argument("--max_ml", type=float, default=40.0, help="Largest hemorrhage volume in mL (default: 40).")
    parser.add_argument("--relative_paths", action="store_true",
                        help="Write CSV paths relative to the CSV's folder instead of absolute paths.")
    args = parser.parse_args(argv)
    cohort = generate_cohort(args.out_dir, args.n_train, args.n_val, shape=args.shape, spacing=args.spacing,
                             seed=args.seed, positive_fraction=args.positive_fraction,
                             relative_paths=args.relative_paths, min_ml=args.min_ml, max_ml=args.max_ml)
    print(f"wrote {args.n_train} train + {args.n_val} val scans of {tuple(args.shape)} at {tuple(args.spacing)} mm\n"
          f"  train CSV: {cohort.train_csv}\n  val CSV:   {cohort.val_csv}\n  masks:     {cohort.mask_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
