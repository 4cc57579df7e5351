"""Input checks for the model's public methods.

Every check raises ``ValueError`` whose message states the expected layout (B×1×D×H×W and friends) and what
arrived, so a caller with a transposed volume or a click outside the crop learns what to fix. Shape and dtype
checks are free; the point-range check reads one boolean back from the device (a sync point, cheap next to a
decoder pass).
"""
from __future__ import annotations

import torch


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        shape = "×".join(str(s) for s in value.shape) or "scalar"
        return f"shape {shape} ({value.dtype})"
    return f"a {type(value).__name__}"


def check_volume(images: object, img_size: int, in_chans: int, dtype: torch.dtype, name: str = "images") -> None:
    """Require a floating B×in_chans×S×S×S tensor (S = ``img_size``) of the model's parameter dtype."""
    s = img_size
    expected = f"B×{in_chans}×{s}×{s}×{s} (batch × channel × D × H × W) tensor of dtype {dtype}"
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name}: expected a {expected}, got {_describe(images)}")
    if images.ndim != 5 or images.shape[1] != in_chans or tuple(images.shape[2:]) != (s, s, s):
        raise ValueError(f"{name}: expected a {expected}, got {_describe(images)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: expected a {expected} with B >= 1, got an empty batch")
    # Autocast casts inside the layers; the input itself must match the weights (float32 unless the model
    # was converted), otherwise the first convolution fails with a less helpful message.
    if images.dtype != dtype:
        raise ValueError(f"{name}: expected a {expected}, got {_describe(images)}")


def check_features(features: object, channels: int, grid: int) -> None:
    """Require encoder features of shape B×C×g×g×g."""
    expected = f"B×{channels}×{grid}×{grid}×{grid} encoder features (the output of encode)"
    if not isinstance(features, torch.Tensor) or features.ndim != 5 or features.shape[1] != channels \
            or tuple(features.shape[2:]) != (grid, grid, grid) or not features.is_floating_point():
        raise ValueError(f"features: expected {expected}, got {_describe(features)}")


def check_points(points: object, point_labels: object, batch_size: int, img_size: int) -> None:
    """Require B×P×3 float voxel coordinates and B×P integer labels in {-1, 0, 1}, non-padding points in the volume.

    Coordinates are voxel indices along (D, H, W) of the model input; a point is inside when every coordinate is in
    [0, S). Points labelled -1 are padding (their coordinates are ignored).
    """
    if (points is None) != (point_labels is None):
        raise ValueError("points and point_labels must be given together (both B×P…) or both be None; got "
                         f"points={_describe(points) if points is not None else None}, point_labels="
                         f"{_describe(point_labels) if point_labels is not None else None}")
    if points is None:
        return
    b = batch_size
    if not isinstance(points, torch.Tensor) or points.ndim != 3 or points.shape[0] != b or points.shape[2] != 3 \
            or not points.is_floating_point():
        raise ValueError(f"points: expected a B×P×3 float tensor of voxel coordinates (D, H, W order) with B={b}, "
                         f"got {_describe(points)}")
    p = points.shape[1]
    if not isinstance(point_labels, torch.Tensor) or tuple(point_labels.shape) != (b, p) \
            or point_labels.is_floating_point() or point_labels.dtype == torch.bool:
        raise ValueError(f"point_labels: expected a B×P integer tensor of shape {b}×{p} (1 positive, 0 negative, "
                         f"-1 padding), got {_describe(point_labels)}")
    if p == 0:
        return
    if point_labels.device != points.device:
        raise ValueError(f"point_labels are on {point_labels.device} but points on {points.device}")
    bad_label = (point_labels < -1) | (point_labels > 1)
    real = point_labels != -1
    inside = ((points >= 0) & (points < img_size)).all(dim=-1)  # NaN compares False, so NaN is "outside"
    outside = real & ~inside
    problems = bad_label | outside
    if bool(problems.any()):  # the one device->host sync of the checks
        bi, pi = (int(v) for v in problems.nonzero()[0])
        if bool(bad_label[bi, pi]):
            raise ValueError(f"point_labels: expected values in {{-1, 0, 1}}, got {int(point_labels[bi, pi])} at "
                             f"sample {bi}, point {pi}")
        coords = ", ".join(f"{float(c):g}" for c in points[bi, pi])
        raise ValueError(f"points: every non-padding point must lie inside the {img_size}×{img_size}×{img_size} "
                         f"input (0 <= coordinate < {img_size}, D, H, W order); {int(outside.sum())} do not, "
                         f"e.g. sample {bi}, point {pi} at ({coords})")


def check_mask_prompt(mask_prompt: object, batch_size: int, size: int) -> None:
    """Require B×1×L×L×L low-resolution mask logits (L = 4 × token grid, the decoder's own output size)."""
    if mask_prompt is None:
        return
    expected = f"B×1×{size}×{size}×{size} low-res mask logits with B={batch_size} (the low_res_masks of decode)"
    if not isinstance(mask_prompt, torch.Tensor) or mask_prompt.ndim != 5 or mask_prompt.shape[0] != batch_size \
            or mask_prompt.shape[1] != 1 or tuple(mask_prompt.shape[2:]) != (size, size, size) \
            or not mask_prompt.is_floating_point():
        raise ValueError(f"mask_prompt: expected {expected}, got {_describe(mask_prompt)}")


def check_refiner_image(image: object, batch_size: int, img_size: int) -> None:
    """Require the B×1×S×S×S input volume the features came from (the refiner reads it at full resolution)."""
    s = img_size
    if not isinstance(image, torch.Tensor) or tuple(image.shape) != (batch_size, 1, s, s, s) \
            or not image.is_floating_point():
        raise ValueError(f"image: the model refines masks at full resolution and needs the {batch_size}×1×{s}×{s}×{s} "
                         f"input volume the features were computed from (decode(..., image=images)), got "
                         f"{_describe(image) if image is not None else None}")
