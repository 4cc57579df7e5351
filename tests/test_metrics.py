"""Shared metrics and whole-volume inference helpers: numbers equal MONAI's and hand-checked values."""
import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

import metrics
from inference import click_refined_logits, interior_point, sliding_window_logits


def _blob(shape, center, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return (((grid - np.array(center)[:, None, None, None]) ** 2).sum(0) <= radius ** 2).astype(np.uint8)


def test_volume_ml_is_voxels_times_voxel_volume():
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[:4, :5, :2] = 1
    assert metrics.volume_ml(mask, (1.5, 1.5, 1.5)) == pytest.approx(40 * 3.375 / 1000)


def test_dice_and_hd95_equal_monai():
    truth = _blob((24, 24, 24), (12, 12, 12), 6)
    pred = _blob((24, 24, 24), (13, 12, 11), 5)
    t, p = torch.from_numpy(truth)[None, None].float(), torch.from_numpy(pred)[None, None].float()
    row = metrics.segmentation_metrics(pred, truth, (1.0, 2.0, 1.5))
    assert row["dice"] == pytest.approx(compute_dice(p, t).item())
    expected_hd = compute_hausdorff_distance(p, t, percentile=95, spacing=[1.0, 2.0, 1.5]).item()
    assert row["hd95_mm"] == pytest.approx(expected_hd)
    assert row["volume_error_ml"] == pytest.approx((int(pred.sum()) - int(truth.sum())) * 3.0 / 1000)


def test_empty_truth_convention():
    empty = np.zeros((8, 8, 8), np.uint8)
    some = empty.copy()
    some[2:4, 2:4, 2:4] = 1
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.dice(some, empty) == 0.0
    assert math.isnan(metrics.hd95_mm(some, empty, (1, 1, 1)))


def test_summary_detection_rates():
    rows = [
        {"dice": 0.8, "hd95_mm": 2.0, "volume_pred_ml": 5.0, "volume_true_ml": 6.0, "volume_error_ml": -1.0},
        {"dice": 0.0, "hd95_mm": math.nan, "volume_pred_ml": 0.0, "volume_true_ml": 2.0, "volume_error_ml": -2.0},
        {"dice": 1.0, "hd95_mm": math.nan, "volume_pred_ml": 0.0, "volume_true_ml": 0.0, "volume_error_ml": 0.0},
        {"dice": 0.0, "hd95_mm": math.nan, "volume_pred_ml": 3.0, "volume_true_ml": 0.0, "volume_error_ml": 3.0},
    ]
    s = metrics.summarize(rows, detection_threshold_ml=0.1)
    assert s["dice"] == pytest.approx(0.45)
    assert s["dice_positive"] == pytest.approx(0.4)
    assert s["sensitivity"] == 0.5 and s["specificity"] == 0.5
    assert s["hd95_mm"] == 2.0 and s["volume_abs_error_ml"] == pytest.approx(1.5)


class _ThresholdModel(torch.nn.Module):
    """Stands in for SamMed3D: logits = image − 0.5, and a click paints its whole window positive."""
    img_size = 16

    def forward(self, images, points=None, point_labels=None, mask_prompt=None):
        if images.shape[2:] != (16, 16, 16):
            raise ValueError(f"window of shape {tuple(images.shape)}")
        if points is not None:
            return {"masks": torch.full_like(images, 5.0)}
        return {"masks": images - 0.5}


def test_sliding_window_covers_volumes_of_any_size():
    image = torch.zeros(1, 1, 20, 9, 33)
    image[..., 3:7, 2:5, 10:30] = 1.0
    logits = sliding_window_logits(_ThresholdModel(), image, roi_size=16)
    assert logits.shape == image.shape
    assert torch.equal(logits > 0, image > 0.5)


def test_click_refines_only_its_window():
    image = torch.zeros(1, 1, 40, 20, 20)
    logits = torch.full_like(image, -5.0)
    refined = click_refined_logits(_ThresholdModel(), image, logits, [(30, 10, 10)], [1], roi_size=16)
    assert refined.shape == image.shape
    # The window is centred on the click (30 - 16 // 2 = 22 along D, 10 - 8 = 2 along H and W).
    expected = torch.zeros_like(image, dtype=torch.bool)
    expected[:, :, 22:38, 2:18, 2:18] = True
    assert torch.equal(refined > 0, expected)
    with pytest.raises(ValueError, match="outside the volume"):
        click_refined_logits(_ThresholdModel(), image, logits, [(45, 1, 1)], [1], roi_size=16)


def test_interior_point_lies_deep_in_the_largest_blob():
    mask = torch.zeros(30, 30, 30)
    mask[2:5, 2:5, 2:5] = 1
    mask[10:21, 10:21, 10:21] = 1
    assert interior_point(mask) == (15, 15, 15)
    assert interior_point(torch.zeros(4, 4, 4)) is None
