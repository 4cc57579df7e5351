"""Hemorrhage shapes for the synthetic head CT (``synthetic.py``): one region builder per lesion kind, and the
volume fitting that sizes a lesion to a target in mL.

A builder draws the lesion's random shape once and returns ``region(scale, grow_mm) -> D×H×W bool``; ``grow_mm``
inflates the lesion (the oedema rim is ``region(scale, 3.0)`` minus the blood). What ``scale`` means depends on
the kind, and ``fit_lesion`` knows how to search it:

- ``ellipsoid``, ``lobulated``: intraparenchymal blobs of radius ~``scale`` mm (volume ~ scale³).
- ``subdural``: a crescent under the inner table spanning a sector of half-angle ``scale`` rad (volume ~ scale²).
- ``intraventricular``: blood layering in the dependent (posterior, for a supine patient) part of one lateral
  ventricle below a horizontal fluid level, with a 0-1 mm periventricular rim; ``scale`` in [0, 1]: up to 0.5 the
  level rises until the ventricle is full, beyond it the cast spreads up to 20 mm into the surrounding parenchyma.
- ``irregular``: an intraparenchymal bleed with ragged, non-convex margins: a ball whose radius is modulated by a
  smooth random field; ``scale`` in [0, 1] is its radius as a fraction of 2.5 times the radius of a ball of the
  target volume.

The last two are searched by bisection (their volume grows with ``scale``) and are always one face-connected piece;
every kind ends within 10 % of the target unless the brain cannot hold it, and the caller then falls back to an
ellipsoid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

LESION_KINDS = ("ellipsoid", "lobulated", "subdural", "intraventricular", "irregular")
_BISECTED_KINDS = ("intraventricular", "irregular")
_CAST_SPREAD_MM = 20.0   # how far a full ventricular cast may spread into the parenchyma
# Lesions touching only at an edge or corner still count as one focus (as in most viewers); every lesion the new
# kinds or separate foci make is face-connected as well, so 6- and 26-connected labelling count the same foci.
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)

Region = Callable[[float, float], np.ndarray]


@dataclass(frozen=True)
class Anatomy:
    """The parts of one phantom head a lesion builder needs; all arrays broadcast to ``shape`` (D×H×W)."""

    frame: tuple[np.ndarray, np.ndarray, np.ndarray]   # (u, v, w) head-frame mm, see synthetic._head_frame
    brain: np.ndarray               # bool, inside the inner table
    brain_r: np.ndarray             # float, 1.0 at the inner table
    brain_semi_mm: float
    eligible: np.ndarray            # bool, where intraparenchymal bleeds may be centred
    ventricles: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]   # (centre, semi-axes) mm per lateral ventricle
    up: tuple[float, float, float]  # head-frame unit vector against gravity (anterior for a supine patient)
    shape: tuple[int, ...]
    spacing: tuple[float, ...]


def ellipsoid(u: np.ndarray, v: np.ndarray, w: np.ndarray, center: Sequence[float],
              semi: Sequence[float]) -> np.ndarray:
    return (((u - center[0]) / semi[0]) ** 2 + ((v - center[1]) / semi[1]) ** 2
            + ((w - center[2]) / semi[2]) ** 2) < 1.0


def ball_radius_mm(volume_ml: float) -> float:
    return (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1 / 3)


def largest_piece(region: np.ndarray) -> np.ndarray:
    """The largest face-connected piece of ``region`` (stray voxels touching it only at an edge or corner dropped)."""
    labels, n = ndimage.label(region)
    if n <= 1:
        return region
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


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


def _random_center(rng: np.random.Generator, anatomy: Anatomy) -> tuple[list[int], list[float]]:
    """A random eligible voxel: its index and its head-frame position in mm."""
    candidates = np.flatnonzero(anatomy.eligible)
    index = [int(i) for i in np.unravel_index(candidates[rng.integers(candidates.size)], anatomy.shape)]
    return index, [float(np.broadcast_to(q, anatomy.shape)[tuple(index)]) for q in anatomy.frame]


def lesion_region(kind: str, rng: np.random.Generator, anatomy: Anatomy, target_ml: float) -> Region:
    """Draw one lesion of ``kind`` (see the module docstring); ``target_ml`` sizes the irregular kind's window."""
    u, v, w = anatomy.frame
    shape, spacing = anatomy.shape, anatomy.spacing
    if kind == "subdural":
        # A crescent 6-12 mm thick under the inner table; ``scale`` is the half-angle (rad) of the convexity
        # sector it covers, so its volume grows roughly with scale².
        theta = rng.uniform(0.0, 2 * math.pi)
        direction = np.array([math.cos(theta), math.sin(theta), rng.uniform(-0.3, 0.3)])
        direction /= np.linalg.norm(direction)
        cosine = (u * direction[0] + v * direction[1] + w * direction[2]) / (np.sqrt(u ** 2 + v ** 2 + w ** 2) + 1e-6)
        thickness_mm = rng.uniform(6.0, 12.0)

        def crescent(scale: float, grow_mm: float) -> np.ndarray:
            depth = (thickness_mm + grow_mm) / anatomy.brain_semi_mm
            return (cosine > math.cos(min(scale, 1.3))) & (anatomy.brain_r >= 1.0 - depth) & (anatomy.brain_r < 1.0)

        return crescent
    if kind == "intraventricular":
        return _intraventricular(rng, anatomy)
    if kind == "irregular":
        return _irregular(rng, anatomy, target_ml)

    # Blobs: centred on a random eligible voxel (deep in the brain, outside the ventricles), randomly oriented,
    # evaluated only inside a bounding box around the centre.
    center_index, center = _random_center(rng, anatomy)
    rotation = _random_rotation(rng)

    def local(half_mm: float) -> tuple[tuple[slice, ...], list[np.ndarray]]:
        window = _box(shape, spacing, center_index, half_mm)
        d = [np.broadcast_to(q, shape)[window] - c for q, c in zip(anatomy.frame, center)]
        return window, [rotation[0, i] * d[0] + rotation[1, i] * d[1] + rotation[2, i] * d[2] for i in range(3)]

    if kind == "ellipsoid":
        aspect = rng.uniform(0.75, 1.3, size=3)
        aspect /= aspect.prod() ** (1 / 3)

        def ellipsoid_region(scale: float, grow_mm: float) -> np.ndarray:
            semi = [scale * a + grow_mm for a in aspect]
            window, p = local(max(semi))
            region = np.zeros(shape, dtype=bool)
            region[window] = ellipsoid(p[0], p[1], p[2], (0.0, 0.0, 0.0), semi)
            return region

        return ellipsoid_region
    if kind != "lobulated":
        raise ValueError(f"unknown lesion kind {kind!r}; expected one of {', '.join(LESION_KINDS)}")
    n_lobes = int(rng.integers(3, 7))
    offsets = rng.normal(size=(n_lobes, 3))
    offsets *= (rng.uniform(0.3, 0.7, size=n_lobes) / np.linalg.norm(offsets, axis=1))[:, None]
    radii = rng.uniform(0.5, 0.8, size=n_lobes)

    def lobulated(scale: float, grow_mm: float) -> np.ndarray:
        window, p = local(scale * 1.5 + grow_mm)
        inside = np.zeros(p[0].shape, dtype=bool)
        for offset, radius in zip(offsets, radii):
            r = radius * scale + grow_mm
            inside |= ellipsoid(p[0], p[1], p[2], offset * scale, (r, r, r))
        region = np.zeros(shape, dtype=bool)
        region[window] = inside
        return region

    return lobulated


def _intraventricular(rng: np.random.Generator, anatomy: Anatomy) -> Region:
    """Blood settling in one lateral ventricle: below a fluid level that is horizontal in the scanner (gravity does
    not follow the head's tilt), then, once the ventricle is full, a cast spreading into the parenchyma."""
    center, semi = anatomy.ventricles[int(rng.integers(len(anatomy.ventricles)))]
    rim_mm = rng.uniform(0.0, 1.0)   # a little periventricular blood even when the ventricle is not full
    reach = [s + rim_mm + _CAST_SPREAD_MM + 4.0 for s in semi]
    nearby = np.broadcast_to(ellipsoid(*anatomy.frame, center, reach), anatomy.shape)
    window = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(nearby))
    q = [np.broadcast_to(c, anatomy.shape)[window] for c in anatomy.frame]
    height = q[0] * anatomy.up[0] + q[1] * anatomy.up[1] + q[2] * anatomy.up[2]

    def layered(scale: float, grow_mm: float) -> np.ndarray:
        fill, spread = (scale / 0.5, 0.0) if scale <= 0.5 else (1.0, (scale - 0.5) / 0.5 * _CAST_SPREAD_MM)
        cast = ellipsoid(q[0], q[1], q[2], center, [s + rim_mm + spread + grow_mm for s in semi])
        region = np.zeros(anatomy.shape, dtype=bool)
        if cast.any():
            low, high = float(height[cast].min()), float(height[cast].max())
            region[window] = largest_piece(cast & (height <= low + fill * (high - low)))
        return region

    return layered


def _irregular(rng: np.random.Generator, anatomy: Anatomy, target_ml: float) -> Region:
    """A ball whose radius varies by ±``roughness`` standard deviations of a smooth random field (correlation length
    about a third of the radius): margins with bays and spurs around a solid core. Only the piece holding the centre
    is kept, so it is one lesion."""
    center_index, _ = _random_center(rng, anatomy)
    max_radius = 2.5 * ball_radius_mm(target_ml)   # the field carves volume away, so allow a larger ball
    window = _box(anatomy.shape, anatomy.spacing, center_index, 1.5 * max_radius + 4.0)
    d = [np.broadcast_to(q, anatomy.shape)[window] - np.broadcast_to(q, anatomy.shape)[tuple(center_index)]
         for q in anatomy.frame]
    distance = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    correlation_mm = rng.uniform(0.2, 0.4) * ball_radius_mm(target_ml)
    roughness = rng.uniform(0.45, 0.7)
    field = ndimage.gaussian_filter(rng.standard_normal(distance.shape),
                                    sigma=[correlation_mm / s for s in anatomy.spacing], mode="reflect")
    field = (field - field.mean()) / max(float(field.std()), 1e-6)
    local_center = tuple(c - s.start for c, s in zip(center_index, window))

    def ragged(scale: float, grow_mm: float) -> np.ndarray:
        radius = scale * max_radius
        # The core (a third of the radius) keeps the centre inside however the field falls there.
        inside = (distance < radius * (1.0 - roughness * field) + grow_mm) | (distance < radius / 3.0 + grow_mm)
        labels, _ = ndimage.label(inside)
        region = np.zeros(anatomy.shape, dtype=bool)
        if labels[local_center]:
            region[window] = labels == labels[local_center]
        return region

    return ragged


def _fit_volume(region_of: Region, scale: float, exponent: float, target_ml: float, voxel_ml: float,
                allowed: np.ndarray) -> tuple[np.ndarray, float]:
    """Rescale a lesion until its volume inside ``allowed`` is within 10 % of ``target_ml`` (at most 8 tries)."""
    region = region_of(scale, 0.0) & allowed
    for _ in range(8):
        realised = float(np.count_nonzero(region)) * voxel_ml
        if abs(realised - target_ml) <= 0.1 * target_ml:
            break
        scale *= (target_ml / max(realised, 0.05 * target_ml)) ** (1.0 / exponent)
        region = region_of(scale, 0.0) & allowed
    return region, scale


def _bisect_volume(region_of: Region, target_ml: float, voxel_ml: float, allowed: np.ndarray
                   ) -> tuple[np.ndarray, float]:
    """``scale`` in [0, 1] whose region inside ``allowed`` is within 3 % of ``target_ml`` (or the closest found);
    the whole range when even that is too small (the caller then falls back to another kind)."""
    region = region_of(1.0, 0.0) & allowed
    if np.count_nonzero(region) * voxel_ml <= target_ml:
        return region, 1.0
    low, high = 0.0, 1.0
    best = (math.inf, region, 1.0)
    for _ in range(30):
        middle = (low + high) / 2.0
        region = region_of(middle, 0.0) & allowed
        error = float(np.count_nonzero(region)) * voxel_ml - target_ml
        if abs(error) < best[0]:
            best = (abs(error), region, middle)
        if abs(error) <= 0.03 * target_ml:
            break
        low, high = (middle, high) if error < 0 else (low, middle)
    return best[1], best[2]


def fit_lesion(kind: str, region_of: Region, target_ml: float, voxel_ml: float, allowed: np.ndarray
               ) -> tuple[np.ndarray, float]:
    """The lesion's voxels inside ``allowed`` at the scale that best matches ``target_ml``, and that scale."""
    if kind == "subdural":
        return _fit_volume(region_of, 0.5, 2.0, target_ml, voxel_ml, allowed)
    if kind in _BISECTED_KINDS:
        return _bisect_volume(region_of, target_ml, voxel_ml, allowed)
    return _fit_volume(region_of, ball_radius_mm(target_ml), 3.0, target_ml, voxel_ml, allowed)


def place_lesion(kind: str, target_ml: float, rng: np.random.Generator, anatomy: Anatomy, mask: np.ndarray,
                 voxel_ml: float, separate: bool) -> tuple[np.ndarray, str, Region, float]:
    """Draw and size one lesion next to the blood already in ``mask``: (region, kind drawn, region_of, scale).

    A lesion that cannot reach 90 % of its volume (a crescent or a ventricle too small) becomes an ellipsoid. With
    ``separate`` it keeps a one-voxel gap (26-connectivity) to earlier blood, is centred at least its own radius
    + 3 mm away, and is trimmed to its largest face-connected piece; it gets three tries of its kind, then three as
    an ellipsoid."""
    allowed = anatomy.brain & ~mask
    attempts: tuple[str, ...] = (kind, "ellipsoid")
    if separate and mask.any():
        allowed &= ~ndimage.binary_dilation(mask, structure=CONNECTIVITY)
        clearance = ndimage.distance_transform_edt(~mask, sampling=anatomy.spacing)
        far = anatomy.eligible & (clearance > ball_radius_mm(target_ml) + 3.0)
        if far.any():
            anatomy = replace(anatomy, eligible=far)
        attempts = (kind,) * 3 + ("ellipsoid",) * 3
    for attempt_kind in attempts:
        region_of = lesion_region(attempt_kind, rng, anatomy, target_ml)
        region, scale = fit_lesion(attempt_kind, region_of, target_ml, voxel_ml, allowed)
        if separate:
            region = largest_piece(region)
        if np.count_nonzero(region) * voxel_ml >= 0.9 * target_ml:
            break
    return region, attempt_kind, region_of, scale
