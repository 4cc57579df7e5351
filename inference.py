"""Whole-volume inference with a SAM-Med3D model, shared by validation (trainer.py) and predict.py.

A preprocessed volume of any size is segmented prompt-free by MONAI sliding-window inference over windows of the
model's input size. Clicks then refine that answer the way SAM is used interactively: for each click the window
centred on it is decoded with the click (and every earlier click inside the window) as point prompts and the
current prediction of the window as the mask prompt, and the new logits replace the old ones only on the part of
the prediction the click is about (the connected region of old-or-new foreground at the click, within a radius
that grows with the click's distance from the current answer's edge), and only in the click's direction (a
hemorrhage click adds, a background click removes), so a click on one focus of a multifocal bleed leaves the other
foci as they were, and a click on the thin missed rim of a nearly right answer corrects that rim, not the bleed.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from scipy import ndimage

from data.preprocess import pad_with_air

logger = logging.getLogger(__name__)

SLIDING_WINDOW_OVERLAP = 0.25
# Mask prompts are clamped to this logit range: the refiner can push logits far beyond what the decoder itself
# produces (and its mask-downscaling convs saw in pretraining); past ±20 the probability is 0 or 1 anyway.
MASK_PROMPT_LOGIT_LIMIT = 20.0
# A click decides about the connected foreground (old or new prediction) within this many voxels of it.
CLICK_REACH_VOXELS = 2
# ...and changes the answer at most this many times as far from itself as it lies from the current answer's edge
# (never less than MIN_CLICK_RADIUS_VOXELS): a click just outside a bleed's predicted border extends that border
# locally, a click deep inside a missed or false region may redo all of it. Without the limit a positive click
# on the thin missed rim of a nearly right answer let the decoder add a whole second bleed's worth of voxels
# (measured on a self-test model: one click took a scan from Dice 0.82 to 0.62).
CLICK_RADIUS_FACTOR = 4.0
MIN_CLICK_RADIUS_VOXELS = 4.0


def choose_amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 on GPUs that support it (Ampere+), fp16 on older GPUs, None when AMP is off or on CPU.

    CPU autocast is refused on purpose: without native bf16 units the 3-D convolutions and matmuls fall back to
    slow paths (measured ~60x slower than fp32 for one ViT-B step on this project's CI machine).
    """
    if not enabled:
        return None
    if device.type == "cpu":
        logger.warning("--use_mixed_precision ignored on CPU (bf16 autocast is far slower than fp32 there)")
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """autocast when ``dtype`` is given, else a no-op: the single precision path for train and inference."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def sliding_window_logits(model: torch.nn.Module, image: torch.Tensor, roi_size: int,
                          amp_dtype: torch.dtype | None = None, sw_batch_size: int = 2,
                          overlap: float = SLIDING_WINDOW_OVERLAP) -> torch.Tensor:
    """Prompt-free mask logits for a whole volume.

    Args:
        model: a SamMed3D (or a DDP/compiled wrapper around one) whose forward returns ``{"masks": B×1×S×S×S}``.
        image: 1×1×D×H×W preprocessed volume on the model's device; any D, H, W (padded internally with the
            volume's minimum, i.e. air, as the training crops are).
        roi_size: the model's input size S.
    Returns:
        1×1×D×H×W float32 logits.
    """

    def predictor(window: torch.Tensor) -> torch.Tensor:
        return model(window)["masks"].float()

    with autocast_context(image.device, amp_dtype):
        logits = sliding_window_inference(image, roi_size=(roi_size,) * 3, sw_batch_size=sw_batch_size,
                                          predictor=predictor, overlap=overlap, mode="gaussian",
                                          padding_mode="constant", cval=float(image.min()))
    return torch.as_tensor(logits).float()


# Test-time mirroring (predict.py's default): the prompt-free answer averages the probabilities of the volume as
# it is and mirrored along each spatial axis in turn (4 passes). Training mirrors every axis, so each view is one the
# model learned; errors that hang on one orientation (the vertex's bone/scalp partial-volume rim read as blood) are
# outvoted. Measured on the learning benchmark's models, off -> on: negatives empty thin 2/4 -> 4/4, multifocal
# 5/6 -> 4/6 (two blobs of 0.2 mL), repro and ctich unchanged; Dice +0.026 / -0.003 / +0.011 / +0.004. nnU-Net's eight
# mirror combinations cost twice as much and left a thin negative unclean (README "What to expect"). Hand-written:
# MONAI's TestTimeAugmentation draws random invertible transforms through a DataLoader; fixed mirrors are flips.
MIRROR_AXES = (2, 3, 4)


@torch.no_grad()
def mirrored_logits(model: torch.nn.Module, image: torch.Tensor, roi_size: int,
                    amp_dtype: torch.dtype | None = None, axes: Sequence[int] = MIRROR_AXES) -> torch.Tensor:
    """Prompt-free logits averaged over the volume and its mirror image along each of ``axes`` (dims of the
    1×1×D×H×W ``image``; none: plain ``sliding_window_logits``). The mean is taken over probabilities (averaging
    logits lets one confident view outvote the rest) and returned as logits, clamped to ±MASK_PROMPT_LOGIT_LIMIT."""
    if not axes:
        return sliding_window_logits(model, image, roi_size, amp_dtype)
    probability = torch.sigmoid(sliding_window_logits(model, image, roi_size, amp_dtype))
    for axis in axes:
        mirrored = sliding_window_logits(model, torch.flip(image, (axis,)), roi_size, amp_dtype)
        probability += torch.sigmoid(torch.flip(mirrored, (axis,)))
    probability /= 1 + len(axes)
    return torch.logit(probability).clamp(-MASK_PROMPT_LOGIT_LIMIT, MASK_PROMPT_LOGIT_LIMIT)


@dataclass(frozen=True)
class Click:
    """A click at voxel ``point`` (d, h, w) of the preprocessed volume: on hemorrhage (positive) or not."""

    point: tuple[float, float, float]
    positive: bool


def drop_components(logits: torch.Tensor, spacing: Sequence[float], min_ml: float,
                    min_peak: float = 0.5) -> torch.Tensor:
    """``logits`` (1×1×D×H×W, voxel ``spacing`` in mm) without the foreground components (6-connected, logits > 0)
    smaller than ``min_ml`` or whose most confident voxel has a probability under ``min_peak`` (hysteresis
    thresholding: a blob is kept only with a confident core). Dropped voxels' logits are negated (the same
    confidence, now for background), so the probability map and every threshold above 0.5 agree. The input itself
    when neither criterion can drop anything (``min_ml`` <= 0 and ``min_peak`` <= 0.5) or nothing is dropped.

    Prompt-free answers only: a component a user's click produced is the user's decision. scipy labels the
    components (MONAI's RemoveSmallObjects needs scikit-image, which is not a dependency, and has no peak rule).
    """
    if min_ml <= 0 and min_peak <= 0.5:
        return logits
    foreground = (logits[0, 0] > 0).cpu().numpy()
    components, count = ndimage.label(foreground)
    if count == 0:
        return logits
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sizes_ml = np.bincount(components.ravel())[1:] * voxel_ml
    weak = sizes_ml < min_ml
    if min_peak > 0.5:
        peaks = ndimage.maximum(logits[0, 0].float().cpu().numpy(), components, np.arange(1, count + 1))
        weak |= np.asarray(peaks) < math.log(min_peak / (1.0 - min_peak))
    dropped_ids = 1 + np.flatnonzero(weak)
    if dropped_ids.size == 0:
        return logits
    dropped = torch.from_numpy(np.isin(components, dropped_ids)).to(logits.device)[None, None]
    return torch.where(dropped, -logits, logits)


def mask_prompt_from_logits(logits: torch.Tensor, mask_size: int) -> torch.Tensor:
    """Full-resolution logits B×1×S³ -> the decoder's mask prompt B×1×L³ (area average, clamped).

    The one conversion used by training's click rounds and by interactive inference, so the decoder always sees
    its current answer the same way.
    """
    low = F.adaptive_avg_pool3d(logits.float(), mask_size)
    return low.clamp(-MASK_PROMPT_LOGIT_LIMIT, MASK_PROMPT_LOGIT_LIMIT)


def _window_start(center: float, size: int, roi: int) -> int:
    return int(min(max(round(center) - roi // 2, 0), max(size - roi, 0)))


def _region_of_click(old: np.ndarray, new: np.ndarray, local: Sequence[float]) -> np.ndarray:
    """The voxels a click decides about: the connected components of old-or-new foreground that come within
    CLICK_REACH_VOXELS of it (empty when neither prediction has foreground there)."""
    union = old | new
    components, count = ndimage.label(union)
    if count == 0:
        return np.zeros_like(union)
    near = tuple(slice(max(int(round(c)) - CLICK_REACH_VOXELS, 0), int(round(c)) + CLICK_REACH_VOXELS + 1)
                 for c in local)
    touched = np.unique(components[near])
    return np.isin(components, touched[touched > 0])


def _click_ball(old: np.ndarray, local: Sequence[float], positive: bool) -> np.ndarray:
    """The voxels within the click's radius: CLICK_RADIUS_FACTOR × the click's distance to the nearest voxel of the
    answer it contradicts (the current foreground for a hemorrhage click, background for a background click), at
    least MIN_CLICK_RADIUS_VOXELS; everything when the window holds no such voxel."""
    other = np.argwhere(old if positive else ~old)
    point = np.asarray(local, dtype=np.float64)
    if other.size == 0:
        return np.ones_like(old)
    distance = float(np.sqrt(((other - point) ** 2).sum(axis=1).min()))
    radius = max(MIN_CLICK_RADIUS_VOXELS, CLICK_RADIUS_FACTOR * distance)
    grid = np.ogrid[tuple(slice(0, n) for n in old.shape)]
    return sum((axis - p) ** 2 for axis, p in zip(grid, point)) <= radius ** 2


@torch.no_grad()
def apply_clicks(model: torch.nn.Module, image: torch.Tensor, logits: torch.Tensor, clicks: Sequence[Click],
                 roi_size: int, amp_dtype: torch.dtype | None = None, earlier: Sequence[Click] = ()) -> torch.Tensor:
    """Refine whole-volume ``logits`` with ``clicks``, applied one after another (module docstring).

    Args:
        model: a SamMed3D (``mask_size`` L, input size ``roi_size``).
        image: 1×1×D×H×W preprocessed volume.
        logits: 1×1×D×H×W current logits of the same volume (not modified), e.g. sliding_window_logits.
        clicks: in voxel coordinates of ``image``; every coordinate within [0, size - 1].
        earlier: clicks of the same session already applied to ``logits``; they are prompts again wherever they
            fall into a new click's window, as in SAM's interactive loop.
    Returns:
        1×1×D×H×W float32 logits.
    """
    spatial = tuple(image.shape[2:])
    session = [*earlier, *clicks]
    for click in session:
        if any(not 0 <= c <= n - 1 for c, n in zip(click.point, spatial)):
            raise ValueError(f"click {tuple(click.point)} lies outside the volume of shape {spatial}")
    if not clicks:
        return logits.clone()
    # Small volumes are padded to one window: the image with air (as the training crops), the logits with a
    # confident "no hemorrhage".
    padded = pad_with_air(image[0], roi_size, method="end")[None]
    # A copy: the caller's logits stay as they were (pad_with_air returns its input when nothing needs padding).
    state = pad_with_air(logits[0].float(), roi_size, method="end", fill=-MASK_PROMPT_LOGIT_LIMIT)[None].clone()
    mask_size = int(model.mask_size)
    for index in range(len(earlier), len(session)):
        click = session[index]
        starts = [_window_start(c, padded.shape[2 + axis], roi_size) for axis, c in enumerate(click.point)]
        box = (slice(None), slice(None)) + tuple(slice(s, s + roi_size) for s in starts)
        # SAM accumulates the clicks of a session: every earlier click that falls into this window is a prompt too.
        inside = [c for c in session[:index + 1]
                  if all(s <= p < s + roi_size for p, s in zip(c.point, starts))]
        points = torch.tensor([[p - s for p, s in zip(c.point, starts)] for c in inside], dtype=torch.float32)
        labels = torch.tensor([int(c.positive) for c in inside], dtype=torch.long)
        current = state[box]
        with autocast_context(image.device, amp_dtype):
            new = model(padded[box], points=points[None].to(image.device), point_labels=labels[None].to(image.device),
                        mask_prompt=mask_prompt_from_logits(current, mask_size))["masks"].float()
        local = [p - s for p, s in zip(click.point, starts)]
        old_foreground = (current[0, 0] > 0).cpu().numpy()
        region = (_region_of_click(old_foreground, (new[0, 0] > 0).cpu().numpy(), local)
                  & _click_ball(old_foreground, local, click.positive))
        region_t = torch.from_numpy(region).to(state.device)[None, None]
        # A click only moves the answer its own way: a hemorrhage click can add blood but never remove it, a
        # background click only removes; a click can therefore not undo what the user did not click on.
        moved = torch.maximum(current, new) if click.positive else torch.minimum(current, new)
        state[box] = torch.where(region_t, moved, current)
    return state[:, :, :spatial[0], :spatial[1], :spatial[2]].clone()


def next_click(prediction: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> Click | None:
    """The deterministic simulated click of validation: the voxel deepest inside the largest error region.

    prediction, truth: D×H×W (any type, > 0 is foreground). The click is positive on missed hemorrhage (false
    negative) and negative on a false positive; None when the prediction is already perfect.
    """
    pred = np.asarray(torch.as_tensor(prediction).detach().cpu() > 0)
    gt = np.asarray(torch.as_tensor(truth).detach().cpu() > 0)
    errors = pred ^ gt
    if not errors.any():
        return None
    components, count = ndimage.label(errors)
    sizes = np.bincount(components.ravel())[1:]
    depth = interior_depth(components == int(sizes.argmax()) + 1)
    point = np.unravel_index(int(depth.argmax()), depth.shape)
    return Click(point=tuple(float(p) for p in point), positive=bool(gt[point]))


def interior_depth(region: np.ndarray) -> np.ndarray:
    """Distance (voxels) of every voxel of the boolean ``region`` to the nearest voxel outside it, the volume's edge
    counting as outside; 0 outside the region. Computed in the region's bounding box padded by one outside voxel,
    which is exact (the nearest outside voxel of a point in a box lies in the box or its one-voxel shell) and a
    fraction of a whole-volume transform."""
    depth = np.zeros(region.shape, dtype=np.float64)
    box = ndimage.find_objects(region.astype(np.uint8))
    if box:
        depth[box[0]] = ndimage.distance_transform_edt(np.pad(region[box[0]], 1))[1:-1, 1:-1, 1:-1]
    return depth


# Validation and predict.py's evaluation report Dice after this many simulated clicks.
SIMULATED_CLICKS = (1, 3, 5)


def simulated_click_logits(model: torch.nn.Module, image: torch.Tensor, truth: torch.Tensor, logits: torch.Tensor,
                           roi_size: int, amp_dtype: torch.dtype | None = None,
                           counts: Sequence[int] = SIMULATED_CLICKS) -> dict[int, torch.Tensor]:
    """Logits after k simulated clicks, for each k in ``counts``: a user's session in which every click is placed
    deterministically on the largest remaining error (``next_click``) and applied with the earlier ones
    (``apply_clicks``). A perfect answer gets no more clicks and keeps its logits.

    image, truth, logits: 1×1×D×H×W (truth in {0, 1}). Returns {k: 1×1×D×H×W float32 logits}.
    """
    session: list[Click] = []
    state = logits
    results: dict[int, torch.Tensor] = {}
    for k in range(1, max(counts, default=0) + 1):
        click = next_click(state[0, 0] > 0, truth[0, 0])
        if click is not None:
            state = apply_clicks(model, image, state, [click], roi_size, amp_dtype, earlier=session)
            session.append(click)
        if k in counts:
            results[k] = state
    return results
