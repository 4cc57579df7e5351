"""Whole-volume inference with a SAM-Med3D model, shared by validation (trainer.py) and predict.py.

A preprocessed volume of any size is segmented prompt-free by MONAI sliding-window inference over windows of the
model's input size. A click refines the window centred on it: that window is re-segmented with the click as a
point prompt and pasted over the prompt-free result, which is how a user's click acts in an interactive viewer.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from scipy import ndimage

from data.preprocess import pad_with_air

logger = logging.getLogger(__name__)

SLIDING_WINDOW_OVERLAP = 0.25


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


def _window_start(center: int, size: int, roi: int) -> int:
    return int(min(max(center - roi // 2, 0), max(size - roi, 0)))


@torch.no_grad()
def click_refined_logits(model: torch.nn.Module, image: torch.Tensor, logits: torch.Tensor,
                         points: Sequence[Sequence[float]], labels: Sequence[int], roi_size: int,
                         amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Re-segment the window around the clicks with them as prompts and paste it over ``logits``.

    Args:
        image: 1×1×D×H×W preprocessed volume.
        logits: 1×1×D×H×W prompt-free logits of the same volume (not modified).
        points: clicks as (d, h, w) voxel coordinates of ``image``; the window is centred on their mean.
        labels: 1 for a click on hemorrhage, 0 for a click on background.
    Returns:
        1×1×D×H×W float32 logits.
    """
    if len(points) == 0:
        return logits.clone()
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    spatial = image.shape[2:]
    # Pad small volumes up to one window so every click has a full-size window around it; like the training
    # crops, padding is the volume's minimum (air), not 0 (average tissue after z-scoring).
    pad = [max(roi_size - s, 0) for s in spatial]
    padded = pad_with_air(image[0], roi_size, method="end")[None]
    coords = torch.as_tensor(points, dtype=torch.float32)
    for axis, size in enumerate(spatial):
        if (coords[:, axis] < 0).any() or (coords[:, axis] > size - 1).any():
            raise ValueError(f"click {coords.tolist()} lies outside the volume of shape {tuple(spatial)}")
    center = coords.mean(dim=0).round().long().tolist()
    starts = [_window_start(c, padded.shape[2 + axis], roi_size) for axis, c in enumerate(center)]
    window = padded[:, :, starts[0]:starts[0] + roi_size, starts[1]:starts[1] + roi_size,
                    starts[2]:starts[2] + roi_size]
    local_points = (coords - torch.tensor(starts, dtype=torch.float32))[None].to(image.device)
    local_labels = torch.as_tensor(labels, dtype=torch.long)[None].to(image.device)
    with autocast_context(image.device, amp_dtype):
        window_logits = model(window, points=local_points, point_labels=local_labels)["masks"].float()
    refined = F.pad(logits.clone(), [0, pad[2], 0, pad[1], 0, pad[0]], value=0.0)
    refined[:, :, starts[0]:starts[0] + roi_size, starts[1]:starts[1] + roi_size,
            starts[2]:starts[2] + roi_size] = window_logits
    return refined[:, :, :spatial[0], :spatial[1], :spatial[2]]


def interior_point(mask: torch.Tensor) -> tuple[int, int, int] | None:
    """A deterministic click inside ``mask`` (D×H×W): the foreground voxel deepest inside the largest blob.

    Used for the validation "1-click" score so it is reproducible; None for an empty mask. (scipy rather than
    MONAI's get_largest_connected_component_mask: that needs scikit-image, labels 26-connected by default and
    breaks ties between equal blobs in no defined order; this keeps the 6-connected lowest-label choice.)
    """
    array = mask.detach().cpu().numpy() > 0
    if not array.any():
        return None
    components, count = ndimage.label(array)
    if count > 1:
        sizes = ndimage.sum(array, components, index=range(1, count + 1))
        array = components == (int(sizes.argmax()) + 1)
    depth = ndimage.distance_transform_edt(array)
    index = int(depth.argmax())
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(index), array.shape))
