"""Shared metrics and whole-volume inference helpers: numbers equal MONAI's and hand-checked values."""
import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

import metrics
import inference
from inference import Click, apply_clicks, mirrored_logits, next_click, sliding_window_logits


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
    """Stands in for SamMed3D: prompt-free logits = image − 0.5; with clicks it answers from the mask prompt and
    the clicks alone: the mask prompt (upsampled) plus a 3³ blob painted positive/negative at each click."""
    img_size = 16
    mask_size = 4

    def __init__(self):
        super().__init__()
        self.mask_prompts = []

    def forward(self, images, points=None, point_labels=None, mask_prompt=None):
        if images.shape[2:] != (16, 16, 16):
            raise ValueError(f"window of shape {tuple(images.shape)}")
        if points is None:
            return {"masks": images - 0.5}
        self.mask_prompts.append(mask_prompt)
        out = torch.nn.functional.interpolate(mask_prompt, size=(16, 16, 16), mode="nearest").clone()
        for (d, h, w), label in zip(points[0].round().long().tolist(), point_labels[0].tolist()):
            out[..., max(d - 1, 0):d + 2, max(h - 1, 0):h + 2, max(w - 1, 0):w + 2] = 5.0 if label == 1 else -5.0
        return {"masks": out}


def test_sliding_window_covers_volumes_of_any_size():
    image = torch.zeros(1, 1, 20, 9, 33)
    image[..., 3:7, 2:5, 10:30] = 1.0
    logits = sliding_window_logits(_ThresholdModel(), image, roi_size=16)
    assert logits.shape == image.shape
    assert torch.equal(logits > 0, image > 0.5)


class _OneSidedModel(torch.nn.Module):
    """Calls hemorrhage wherever the image is bright and the window's first depth half is: an answer that hangs on
    orientation, as the vertex false positives of the thin learning cohort did."""
    img_size = 16

    def forward(self, images):
        logits = torch.where(images > 0.5, 4.0, -4.0)
        logits[:, :, 8:] = -4.0
        return {"masks": logits}


def test_mirrored_logits_average_probabilities_over_the_mirror_images():
    image = torch.zeros(1, 1, 16, 12, 20)
    image[..., 2:5, 3:6, 4:9] = 1.0     # depth 2-4: seen in the first half as is, in the second half mirrored
    image[..., 11:14, 3:6, 4:9] = 1.0   # depth 11-13: the other way round
    model = _OneSidedModel()
    assert torch.equal(mirrored_logits(model, image, 16, axes=()), sliding_window_logits(model, image, 16))
    plain = sliding_window_logits(model, image, 16)
    mirrored = mirrored_logits(model, image, 16)
    # Views: as is, mirrored in depth, height, width. The early region is bright in 3 of 4, the late one in 1 of 4.
    s, t = torch.sigmoid(torch.tensor(4.0)), torch.sigmoid(torch.tensor(-4.0))
    early, late = (3 * s + t) / 4, (s + 3 * t) / 4
    torch.testing.assert_close(torch.sigmoid(mirrored[0, 0, 3, 4, 5]), early)
    torch.testing.assert_close(torch.sigmoid(mirrored[0, 0, 12, 4, 5]), late)
    assert bool((plain[..., 2:5, 3:6, 4:9] > 0).all()) and bool((mirrored[..., 2:5, 3:6, 4:9] > 0).all())
    assert not bool((mirrored[..., 11:14, 3:6, 4:9] > 0).any())   # outvoted 3:1
    assert mirrored.shape == image.shape and float(mirrored.abs().max()) <= 20.0


def test_a_positive_click_adds_its_region_and_leaves_other_foci_alone():
    image = torch.zeros(1, 1, 40, 20, 20)
    logits = torch.full_like(image, -5.0)
    logits[..., 22:26, 2:6, 2:6] = 5.0          # a focus inside the click's window, away from the click
    logits[..., 2:5, 2:5, 2:5] = 5.0            # another focus outside it
    model = _ThresholdModel()
    refined = apply_clicks(model, image, logits, [Click((30, 10, 10), True)], roi_size=16)
    assert refined.shape == image.shape
    expected = logits > 0
    expected[..., 29:32, 9:12, 9:12] = True     # the click's blob is added ...
    assert torch.equal(refined > 0, expected)  # ... and nothing else changes
    # The decoder saw the current prediction of the window as its mask prompt (window starts at 22, 2, 2).
    prompt = model.mask_prompts[-1]
    assert prompt.shape == (1, 1, 4, 4, 4)
    assert prompt[0, 0, 0, 0, 0] > 0 and prompt[0, 0, 3, 3, 3] < 0
    with pytest.raises(ValueError, match="outside the volume"):
        apply_clicks(model, image, logits, [Click((45, 1, 1), True)], roi_size=16)


def test_a_negative_click_removes_only_the_false_positive_it_is_on():
    image = torch.zeros(1, 1, 24, 24, 24)
    logits = torch.full_like(image, -5.0)
    logits[..., 10:13, 10:13, 10:13] = 5.0      # false positive, clicked
    logits[..., 3:6, 3:6, 3:6] = 5.0            # true focus in the same window
    refined = apply_clicks(_ThresholdModel(), image, logits, [Click((11, 11, 11), False)], roi_size=16)
    expected = logits > 0
    expected[..., 10:13, 10:13, 10:13] = False
    assert torch.equal(refined > 0, expected)


def test_earlier_clicks_are_prompts_again_but_not_reapplied():
    image = torch.zeros(1, 1, 16, 16, 16)
    logits = torch.full_like(image, -5.0)
    model = _ThresholdModel()
    first = Click((4, 4, 4), True)
    once = apply_clicks(model, image, logits, [first], roi_size=16)
    twice = apply_clicks(model, image, once, [Click((11, 11, 11), True)], roi_size=16, earlier=[first])
    assert bool((twice[..., 4, 4, 4] > 0).all()) and bool((twice[..., 11, 11, 11] > 0).all())
    assert len(model.mask_prompts) == 2  # one decoder call per new click
    assert bool((logits < 0).all()) and bool((once[..., 11, 11, 11] < 0).all())  # inputs are never modified


def test_next_click_is_deep_in_the_largest_error_with_the_right_label():
    truth = torch.zeros(30, 30, 30)
    truth[10:21, 10:21, 10:21] = 1              # missed: the largest error
    prediction = torch.zeros(30, 30, 30)
    prediction[2:5, 2:5, 2:5] = 1               # a small false positive
    click = next_click(prediction, truth)
    assert click == Click((15.0, 15.0, 15.0), True)
    prediction[10:21, 10:21, 10:21] = 1          # now only the false positive is wrong
    assert next_click(prediction, truth) == Click((3.0, 3.0, 3.0), False)
    assert next_click(truth, truth) is None


def test_next_click_counts_the_volume_edge_as_border_and_ignores_other_regions():
    truth = torch.zeros(20, 20, 20)
    truth[0:7, 0:7, 0:7] = 1                     # missed, in the volume's corner: the edge is border too
    prediction = torch.zeros(20, 20, 20)
    prediction[12:20, 12:19, 14:17] = 1          # a smaller false positive elsewhere
    assert next_click(prediction, truth) == Click((3.0, 3.0, 3.0), True)
    truth[:] = 0
    truth[12:20, 12:20, 12:20] = 1               # now the only error is the missed half of a bleed at the far edge
    prediction[:] = 0
    prediction[12:20, 12:20, 12:16] = 1
    click = next_click(prediction, truth)        # the missed part is 8×8×4 (axis 2 from 16 to 19)
    assert click.positive and click.point[2] in (17.0, 18.0) and 12 <= click.point[0] <= 19


def test_a_click_only_moves_the_answer_its_own_way():
    image = torch.zeros(1, 1, 16, 16, 16)
    logits = torch.full_like(image, -5.0)
    logits[..., 5:10, 5:10, 5:10] = 5.0         # predicted blob

    class Shrinking(_ThresholdModel):
        """Answers a positive click inside the blob with a smaller blob."""
        def forward(self, images, points=None, point_labels=None, mask_prompt=None):
            out = torch.full_like(images, -5.0)
            out[..., 6:9, 6:9, 6:9] = 5.0
            return {"masks": out}

    refined = apply_clicks(Shrinking(), image, logits, [Click((7, 7, 7), True)], roi_size=16)
    assert torch.equal(refined > 0, logits > 0)  # a hemorrhage click never removes blood


def test_a_click_next_to_the_answer_only_changes_it_near_the_click():
    image = torch.zeros(1, 1, 32, 32, 32)
    logits = torch.full_like(image, -5.0)
    logits[..., 8:24, 8:24, 8:24] = 5.0          # a predicted bleed

    class Flooding(_ThresholdModel):
        """Answers any click by marking the whole window (the over-eager decoder a click must not let through)."""
        def forward(self, images, points=None, point_labels=None, mask_prompt=None):
            return {"masks": torch.full_like(images, 5.0 if int(point_labels[0, -1]) == 1 else -5.0)}

    click = Click((16, 16, 25), True)            # one voxel outside the answer's border (axis 2 ends at 23)
    refined = apply_clicks(Flooding(), image, logits, [click], roi_size=16)
    added = (refined > 0) & ~(logits > 0)
    where = torch.nonzero(added[0, 0]).float()
    radius = max(inference.MIN_CLICK_RADIUS_VOXELS, inference.CLICK_RADIUS_FACTOR * 2.0)  # 2 voxels from the edge
    assert added.any() and bool(added[0, 0, 16, 16, 25])
    assert float((where - torch.tensor(click.point)).norm(dim=1).max()) <= radius
    # The same for a background click just inside the border: it removes near itself, not the whole bleed.
    inside = Click((16, 16, 22), False)
    trimmed = apply_clicks(Flooding(), image, logits, [inside], roi_size=16)
    removed = (logits > 0) & ~(trimmed > 0)
    gone = torch.nonzero(removed[0, 0]).float()
    assert bool(removed[0, 0, 16, 16, 22]) and int(removed.sum()) < int((logits > 0).sum()) // 2
    assert float((gone - torch.tensor(inside.point)).norm(dim=1).max()) <= radius
    # Deep inside a missed region (no answer anywhere in the window) a click may redo the whole window.
    empty = torch.full_like(image, -5.0)
    flooded = apply_clicks(Flooding(), image, empty, [Click((16, 16, 16), True)], roi_size=16)
    assert int((flooded > 0).sum()) == 16 ** 3   # the click's window, all of it


def test_small_prompt_free_components_are_dropped_by_volume():
    logits = torch.full((1, 1, 20, 20, 20), -3.0)
    logits[0, 0, 2:8, 2:8, 2:8] = 4.0        # 216 voxels: 1.728 mL at 2 mm
    logits[0, 0, 15:17, 15:17, 15:18] = 2.0  # 12 voxels: 0.096 mL at 2 mm, 0.012 mL at 1 mm
    kept = inference.drop_components(logits, (2.0, 2.0, 2.0), 0.3)
    assert int((kept > 0).sum()) == 216
    assert torch.equal(kept[0, 0, 15:17, 15:17, 15:18], torch.full((2, 2, 3), -2.0))  # same confidence, background
    assert torch.equal(kept[logits < 0], logits[logits < 0])
    # The threshold is a volume: at 10 mm voxels the speck is 12 mL and stays; 0 keeps everything.
    assert inference.drop_components(logits, (10.0, 10.0, 10.0), 0.3) is logits
    assert inference.drop_components(logits, (2.0, 2.0, 2.0), 0.0) is logits
    # Components are 6-connected: two voxels touching only at an edge are two specks.
    diagonal = torch.full((1, 1, 6, 6, 6), -1.0)
    diagonal[0, 0, 2, 2, 2] = diagonal[0, 0, 2, 3, 3] = 1.0
    assert int((inference.drop_components(diagonal, (5.0, 5.0, 5.0), 0.2) > 0).sum()) == 0


def test_prompt_free_components_without_a_confident_core_are_dropped():
    logits = torch.full((1, 1, 20, 20, 20), -3.0)
    logits[0, 0, 2:8, 2:8, 2:8] = 1.0          # a 1.7 mL blob at probability 0.73 ...
    logits[0, 0, 4, 4, 4] = 6.0                # ... with one voxel at 0.998: kept whole
    logits[0, 0, 12:18, 12:18, 12:18] = 2.5    # a blob of the same size whose peak is 0.924: dropped
    kept = inference.drop_components(logits, (2.0, 2.0, 2.0), 0.0, min_peak=0.99)
    assert torch.equal(kept[0, 0, 2:8, 2:8, 2:8], logits[0, 0, 2:8, 2:8, 2:8])
    assert torch.equal(kept[0, 0, 12:18, 12:18, 12:18], torch.full((6, 6, 6), -2.5))
    assert torch.equal(kept[logits < 0], logits[logits < 0])
    # The peak is compared as a probability: 0.92 keeps both, 0.5 (the default) leaves the input untouched.
    assert int((inference.drop_components(logits, (2.0, 2.0, 2.0), 0.0, min_peak=0.92) > 0).sum()) == 2 * 216
    assert inference.drop_components(logits, (2.0, 2.0, 2.0), 0.0) is logits
    # Both rules at once: size drops the small confident speck, the peak rule the large unsure blob.
    logits[0, 0, 10, 2, 2] = 8.0
    both = inference.drop_components(logits, (2.0, 2.0, 2.0), 0.3, min_peak=0.99)
    assert int((both > 0).sum()) == 216 and float(both[0, 0, 10, 2, 2]) == -8.0


def test_icc_2_1_matches_shrout_and_fleiss():
    # Shrout & Fleiss (1979), Table 2: six subjects rated by four judges; ICC(2,1) = 0.29.
    judges = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)
    assert metrics.icc_2_1(*judges.T) == pytest.approx(0.2898, abs=1e-4)
    volumes = np.array([3.0, 10.0, 25.0, 40.0])
    assert metrics.icc_2_1(volumes, volumes) == pytest.approx(1.0)
    assert metrics.icc_2_1(volumes, volumes + 5.0) < metrics.icc_2_1(volumes, volumes + 0.5) < 1.0  # absolute agreement
    assert math.isnan(metrics.icc_2_1([1.0], [2.0]))


def test_bland_altman_bias_and_limits():
    agreement = metrics.bland_altman([10.0, 20.0, 30.0], [12.0, 21.0, 33.0])
    differences = np.array([2.0, 1.0, 3.0])
    assert agreement["bias"] == pytest.approx(2.0)
    assert agreement["loa_high"] - agreement["bias"] == pytest.approx(1.96 * differences.std(ddof=1))
    assert agreement["bias"] - agreement["loa_low"] == pytest.approx(1.96 * differences.std(ddof=1))


def test_bootstrap_ci_is_deterministic_and_brackets_the_mean():
    rng = np.random.default_rng(0)
    rows = [{"value": float(v)} for v in rng.normal(0.7, 0.1, size=40)]

    def mean(sample):
        return {"value": float(np.mean([r["value"] for r in sample])), "undefined": math.nan}

    interval = metrics.bootstrap_ci(rows, mean, resamples=500, seed=1)
    assert interval == metrics.bootstrap_ci(rows, mean, resamples=500, seed=1)
    low, high = interval["value"]
    assert low < mean(rows)["value"] < high
    assert high - low == pytest.approx(2 * 1.96 * 0.1 / math.sqrt(40), rel=0.35)  # the normal-theory width
    assert all(math.isnan(b) for b in interval["undefined"])
