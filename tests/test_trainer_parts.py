"""The training step's pure pieces: schedules, early stopping, accumulation groups (optimization.py), click
sampling, click rounds and the loss (objective.py), precision (inference.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import objective
from config import Config, replace_section
from inference import choose_amp_dtype
from model import build_tiny
from objective import (PromptedSegmentation, SegmentationLoss, _separable_squared_depth, sample_clicks,
                       squared_depth)
from optimization import EarlyStopping, build_scheduler, cosine_warmup_factor, group_sizes, parameter_groups


def _optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_warmup_rises_then_decays_to_the_floor():
    factors = [cosine_warmup_factor(e, warmup_epochs=2, total_epochs=10) for e in range(12)]
    assert factors[0] < factors[1] < factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] == pytest.approx(0.01)


@pytest.mark.parametrize("kind", ["cosine", "step", "reduce_on_plateau"])
def test_each_scheduler_changes_the_rate_as_documented(kind):
    config = replace_section(Config(), "train", scheduler_type=kind, epochs=10, warmup_epochs=0, step_size=2,
                             lr_decay_factor=0.5, patience=3)
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, config)
    rates = []
    for _ in range(6):
        if kind == "reduce_on_plateau":
            scheduler.step(0.5)  # a flat validation Dice
        else:
            scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    if kind == "step":
        assert rates[:4] == [1.0, 0.5, 0.5, 0.25]
    elif kind == "cosine":
        assert all(a > b for a, b in zip(rates, rates[1:]))
    else:
        # patience // 3 = 1 bad epoch allowed, then the rate halves.
        assert rates[0] == 1.0 and rates[-1] < 1.0 and min(rates) == pytest.approx(rates[-1])


def test_plateau_scheduler_keeps_rate_while_dice_improves():
    config = replace_section(Config(), "train", scheduler_type="reduce_on_plateau", patience=3)
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, config)
    for dice in (0.1, 0.2, 0.3, 0.4, 0.5):
        scheduler.step(dice)
    assert optimizer.param_groups[0]["lr"] == 1.0


def test_early_stopping_waits_for_learning_to_start():
    stopper = EarlyStopping(patience=2)
    for epoch in range(10):  # a cold start from scratch: Dice 0 for many validations
        stopper.update(0.0, epoch)
    assert not stopper.should_stop and stopper.best_epoch == 0
    stopper.update(0.01, 10)  # below the learning threshold: still no count
    stopper.update(0.0, 11)
    assert not stopper.should_stop
    assert stopper.update(0.4, 12)
    stopper.update(0.3, 13)
    stopper.update(0.35, 14)
    assert stopper.should_stop and stopper.best_epoch == 12


def test_early_stopping_counts_validations_without_improvement():
    stopper = EarlyStopping(patience=2)
    assert stopper.update(0.5, 0) and not stopper.should_stop
    assert not stopper.update(0.5, 1)  # equal is not better
    assert stopper.update(0.6, 2) and stopper.bad_validations == 0
    assert not stopper.update(math.nan, 3)
    assert not stopper.update(0.59, 4) and stopper.should_stop
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored == stopper and restored.best_epoch == 2


@pytest.mark.parametrize("batches, accumulation, expected", [
    (8, 4, [4, 4]), (10, 4, [4, 4, 2]), (3, 4, [3]), (5, 1, [1, 1, 1, 1, 1])])
def test_short_last_accumulation_group_still_steps(batches, accumulation, expected):
    assert group_sizes(batches, accumulation) == expected
    assert sum(expected) == batches


def test_first_click_is_inside_the_hemorrhage():
    target = torch.zeros(3, 1, 8, 8, 8)
    target[:, :, 2:4, 5:7, 1:3] = 1
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        points, labels = sample_clicks(target, None, generator)
        assert points.shape == (3, 1, 3) and labels.shape == (3, 1)
        assert (labels == 1).all()
        for b in range(3):
            d, h, w = points[b, 0].long().tolist()
            assert target[b, 0, d, h, w] == 1


def test_correction_clicks_come_from_the_error_region():
    target = torch.zeros(2, 1, 8, 8, 8)
    target[:, :, :4] = 1
    prediction = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
    prediction[0, :, :] = True       # sample 0: false positives in d >= 4 only
    prediction[1, :, :2] = True      # sample 1: false negatives in d = 2, 3 only
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        points, labels = sample_clicks(target, prediction, generator)
        assert labels[0, 0] == 0 and points[0, 0, 0] >= 4
        assert labels[1, 0] == 1 and 2 <= points[1, 0, 0] <= 3


def test_clicks_favour_the_inside_of_large_errors_as_validation_does():
    target = torch.zeros(1, 1, 48, 48, 48)
    target[:, :, 4:14, 4:14, 4:14] = 1                 # a missed 10³ bleed (1,000 voxels) ...
    prediction = torch.zeros(1, 1, 48, 48, 48, dtype=torch.bool)
    prediction[:, :, 30, 4:44, 4:44] = True            # ... and a one-voxel-thin false positive (1,600 voxels)
    generator = torch.Generator().manual_seed(3)
    inside = sum(int(sample_clicks(target, prediction, generator)[1][0, 0]) for _ in range(120))
    # Uniform draws would hit the bleed 38 % of the time; weighting by depth² makes it ~72 %.
    assert inside > 0.6 * 120, inside


def test_empty_target_gets_a_negative_click_and_sampling_is_reproducible():
    target = torch.zeros(2, 1, 6, 6, 6)
    a = sample_clicks(target, None, torch.Generator().manual_seed(5))
    b = sample_clicks(target, None, torch.Generator().manual_seed(5))
    assert (a[1] == 0).all()
    assert torch.equal(a[0], b[0])


def test_gpu_distance_transform_equals_scipy():
    # The separable transform (used for crops on a GPU) run on the CPU against scipy's, on shapes with odd sides,
    # regions touching the volume's edge, an empty region and a full one.
    generator = torch.Generator().manual_seed(0)
    blobs = torch.nn.functional.avg_pool3d(torch.rand(3, 1, 9, 14, 11, generator=generator), 3, 1, 1)[:, 0] > 0.5
    regions = torch.cat([blobs, torch.zeros(1, 9, 14, 11, dtype=torch.bool), torch.ones(1, 9, 14, 11, dtype=torch.bool)])
    expected = torch.stack([torch.from_numpy(ndimage.distance_transform_edt(np.pad(r.numpy(), 1))[1:-1, 1:-1, 1:-1]
                                             .astype(np.float32) ** 2) for r in regions])
    assert torch.allclose(_separable_squared_depth(regions), expected)
    assert torch.allclose(squared_depth(regions), expected)
    assert expected[-1].max() == 25  # the full region: depth 5 at the centre of the 9-voxel side (edge = outside)


def test_clicks_on_gpu_path_follow_the_same_weights(monkeypatch):
    # The device path (separable transform) and the CPU path (scipy) give the same click for the same draw.
    target = torch.zeros(2, 1, 12, 12, 12)
    target[0, :, 2:9, 3:8, 4:10] = 1
    prediction = torch.zeros(2, 1, 12, 12, 12, dtype=torch.bool)
    prediction[1, :, 5:7] = True
    cpu = sample_clicks(target, prediction, torch.Generator().manual_seed(7))
    monkeypatch.setattr(objective, "squared_depth", _separable_squared_depth)
    device_path = sample_clicks(target, prediction, torch.Generator().manual_seed(7))
    assert torch.equal(cpu[0], device_path[0]) and torch.equal(cpu[1], device_path[1])


def test_loss_is_low_for_a_correct_prediction_and_ich_term_is_weighted():
    labels = torch.zeros(2, 1, 8, 8, 8)
    labels[0, :, 2:6, 2:6, 2:6] = 1
    good = labels * 20 - 10
    bad = -good
    loss_fn = SegmentationLoss(ich_weight=0.0)
    assert loss_fn([good], None, labels)[0] < 0.05 < loss_fn([bad], None, labels)[0]
    weighted = SegmentationLoss(ich_weight=2.0)
    ich_logit = torch.tensor([-10.0, 10.0])  # wrong on both scans
    total, parts = weighted([good], ich_logit, labels)
    assert total == pytest.approx(parts["mask_loss"] + 2.0 * parts["ich_loss"], rel=1e-5)
    assert parts["ich_loss"] > 5


@pytest.mark.parametrize("blood_voxels", [64, 4])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_hemorrhage_voxels_weigh_half_the_cross_entropy_up_to_the_cap(blood_voxels, cap):
    # 8³ = 512 voxels: 64 of blood get the balancing weight 512 / (2·64) = 4; 4 of blood would get 64, capped.
    labels = torch.zeros(1, 1, 8, 8, 8)
    labels.view(-1)[:blood_voxels] = 1
    logits = torch.zeros_like(labels, requires_grad=True)   # every voxel at p = 0.5: the same BCE gradient magnitude
    loss_fn = SegmentationLoss(ich_weight=0.0)
    if cap is not None:                                       # the trainer's annealed cap (--final_hemorrhage_weight)
        loss_fn.hemorrhage_weight_cap = cap
    loss_fn.mask_loss(logits, labels).backward()
    # The Dice term adds its own gradient; the BCE's is the weight × (p − y) / voxels, so compare without Dice.
    dice_only = torch.zeros_like(labels, requires_grad=True)
    SegmentationLoss(ich_weight=0.0).dice(dice_only, labels).mean().backward()
    bce_grad = (logits.grad - dice_only.grad).view(-1)
    ratio = (bce_grad[:blood_voxels].abs().mean() / bce_grad[blood_voxels:].abs().mean()).item()
    expected = min(512 / (2 * blood_voxels), cap or objective.MAX_HEMORRHAGE_WEIGHT)
    assert ratio == pytest.approx(expected, rel=1e-4)


def test_the_hemorrhage_weight_cap_falls_linearly_from_the_maximum_to_the_final_weight():
    caps = [objective.hemorrhage_weight_cap(epoch, 5, 2.0) for epoch in range(5)]
    assert caps == pytest.approx([10.0, 8.0, 6.0, 4.0, 2.0])
    assert [objective.hemorrhage_weight_cap(e, 5, 10.0) for e in range(5)] == pytest.approx([10.0] * 5)
    assert objective.hemorrhage_weight_cap(0, 1, 3.0) == pytest.approx(3.0)       # one epoch: the final weight
    assert objective.hemorrhage_weight_cap(7, 5, 3.0) == pytest.approx(3.0)       # past the end (more epochs on resume)


def test_hard_voxel_fraction_averages_the_cross_entropy_of_the_hardest_voxels_only():
    # 8³ = 512 voxels, 64 of blood (weight 512 / (2·64) = 4), every voxel a different logit. TopK 10 %: the 51
    # voxels of largest weighted cross-entropy per sample; the Dice term is untouched.
    labels = torch.zeros(2, 1, 8, 8, 8)
    labels.view(2, -1)[:, :64] = 1
    logits = torch.linspace(-3, 3, 2 * 512).reshape(labels.shape)
    all_voxels, hardest = SegmentationLoss(ich_weight=0.0), SegmentationLoss(ich_weight=0.0, hard_voxel_fraction=0.1)
    voxel_bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").flatten(1)
    weighted = voxel_bce * torch.where(labels.flatten(1) > 0.5, 4.0, 1.0)
    dice = all_voxels.dice(logits, labels).flatten(1).mean(dim=1)
    expected_all = (weighted.mean(dim=1) + dice).mean()
    expected_top = (weighted.sort(dim=1, descending=True).values[:, :51].mean(dim=1) + dice).mean()
    assert float(all_voxels.mask_loss(logits, labels)) == pytest.approx(float(expected_all), rel=1e-5)
    assert float(hardest.mask_loss(logits, labels)) == pytest.approx(float(expected_top), rel=1e-5)
    # Only the chosen voxels get cross-entropy gradient: the easy ones get none.
    easy = logits.clone().requires_grad_()
    hardest.mask_loss(easy, labels).backward()
    dice_only = logits.clone().requires_grad_()
    hardest.dice(dice_only, labels).mean().backward()
    bce_grad = (easy.grad - dice_only.grad).flatten(1)
    assert (bce_grad.abs() > 1e-7).sum(dim=1).tolist() == [51, 51]
    chosen = weighted.argsort(dim=1, descending=True)[:, :51]
    assert bool((bce_grad.gather(1, chosen).abs() > 1e-7).all())
    with pytest.raises(ValueError, match="hard_voxel_fraction must be in \\(0, 1\\], got 0"):
        SegmentationLoss(ich_weight=0.0, hard_voxel_fraction=0)


def test_empty_crop_dice_term_charges_false_positives_like_a_missed_share_of_a_bleed():
    # Sample 0 holds blood, sample 1 none. With V = 1/8 of 512 voxels the empty crop's term is F / (2V + F), F the
    # predicted foreground; the crop with blood keeps its Dice.
    labels = torch.zeros(2, 1, 8, 8, 8)
    labels[0, :, 2:6, 2:6, 2:6] = 1
    logits = torch.full(labels.shape, -20.0)
    logits[:, :, :4] = 20.0                          # the top half of both crops says blood
    plain, charged = SegmentationLoss(ich_weight=0.0), SegmentationLoss(ich_weight=0.0, empty_crop_dice_volume=1 / 8)
    foreground = torch.sigmoid(logits[1]).sum()
    extra = float(foreground / (foreground + 2 * 64)) / 2          # averaged over the two samples
    assert float(charged.mask_loss(logits, labels)) == pytest.approx(float(plain.mask_loss(logits, labels)) + extra,
                                                                      rel=1e-5)
    assert extra == pytest.approx(256 / (256 + 128) / 2, rel=1e-4)
    # The positive crop's loss and gradient are unchanged; the empty crop's false positives get more gradient.
    grads = []
    for loss_fn in (plain, charged):
        x = logits.clone().requires_grad_()
        loss_fn.mask_loss(x, labels).backward()
        grads.append(x.grad)
    assert torch.equal(grads[0][0], grads[1][0])
    soft = torch.zeros(labels.shape).requires_grad_()                # p = 0.5 everywhere: gradients are not saturated
    charged.mask_loss(soft, labels).backward()
    soft_plain = torch.zeros(labels.shape).requires_grad_()
    plain.mask_loss(soft_plain, labels).backward()
    assert bool((soft.grad[1] > soft_plain.grad[1]).all())           # pushes every empty-crop voxel further down
    # Off by default, and a fraction.
    assert SegmentationLoss(ich_weight=0.0).empty_crop_dice_volume == 0.0
    with pytest.raises(ValueError, match="empty_crop_dice_volume must be in \\[0, 1\\], got 2"):
        SegmentationLoss(ich_weight=0.0, empty_crop_dice_volume=2)


def test_decoder_term_supervises_the_unrefined_masks_with_its_weight():
    labels = torch.zeros(2, 1, 8, 8, 8)
    labels[0, :, 2:6, 2:6, 2:6] = 1
    good = labels * 20 - 10
    coarse = (-good).requires_grad_()  # the decoder's own answer is wrong
    plain_total, plain_parts = SegmentationLoss(ich_weight=0.0)([good], None, labels, [coarse])
    assert "decoder_loss" not in plain_parts and plain_total == pytest.approx(plain_parts["mask_loss"])
    assert not plain_total.requires_grad  # weight 0: the unrefined masks get no gradient
    total, parts = SegmentationLoss(ich_weight=0.0, decoder_weight=0.5)([good], None, labels, [coarse])
    assert parts["decoder_loss"] > 1 > 0.05 > parts["mask_loss"]
    assert float(total) == pytest.approx(parts["mask_loss"] + 0.5 * parts["decoder_loss"], rel=1e-5)
    total.backward()
    assert coarse.grad.abs().sum() > 0


def test_amp_dtype_choice():
    assert choose_amp_dtype(torch.device("cpu"), False) is None
    assert choose_amp_dtype(torch.device("cpu"), True) is None  # CPU bf16 autocast is ~60x slower


def _groups_by_name(config):
    return {g["name"]: g for g in parameter_groups(build_tiny(), config)}


def test_parameter_groups_follow_the_reference_ratio_and_cover_every_trainable_parameter():
    config = replace_section(Config(), "train", lr=1e-4, decoder_lr_scale=0.1, scratch_lr=2e-3)
    model = build_tiny()
    groups = {g["name"]: g for g in parameter_groups(model, config)}
    assert groups["encoder"]["lr"] == 1e-4
    assert groups["decoder"]["lr"] == pytest.approx(1e-5)
    assert groups["scratch"]["lr"] == 2e-3
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in groups["decoder"]["params"]} == {"prompt_encoder", "mask_decoder"}
    assert {names[id(p)].split(".")[0] for p in groups["scratch"]["params"]} == {"refiner", "representation_head"}
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(set(grouped)) == len(grouped)
    model.set_encoder_frozen(True)
    assert [g["name"] for g in parameter_groups(model, config)] == ["decoder", "scratch"]


def test_schedules_scale_every_group_by_the_same_factor():
    config = replace_section(Config(), "train", scheduler_type="step", step_size=1, lr_decay_factor=0.5, lr=1e-3,
                             decoder_lr_scale=0.1)
    optimizer = torch.optim.AdamW(parameter_groups(build_tiny(), config))
    scheduler = build_scheduler(optimizer, config)
    optimizer.step()
    scheduler.step()
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates["encoder"] == pytest.approx(5e-4) and rates["decoder"] == pytest.approx(5e-5)


def test_click_rounds_start_prompt_free_and_feed_back_the_current_answer():
    torch.manual_seed(0)
    model = build_tiny(refiner=False)
    seen = []
    decode = model.decode

    def spy(features, points=None, point_labels=None, mask_prompt=None, **kwargs):
        seen.append((None if points is None else points.shape[1], mask_prompt))
        return decode(features, points, point_labels, mask_prompt, **kwargs)

    model.decode = spy
    images = torch.randn(2, 1, 64, 64, 64)
    labels = torch.zeros(2, 1, 64, 64, 64)
    labels[:, :, 20:30, 20:30, 20:30] = 1
    out = PromptedSegmentation(model)(images, labels, 2, torch.Generator().manual_seed(0))
    assert len(out["masks"]) == len(out["coarse_masks"]) == 3
    # Without a refiner the decoder's own answer is the answer.
    assert all(torch.equal(m, c) for m, c in zip(out["masks"], out["coarse_masks"]))
    # Round 0: no points, no mask (decoded as the zero mask); then 1 and 2 accumulated clicks, each with the
    # previous round's answer as the mask prompt (B×1×32³, the inference conversion of its logits).
    assert [n for n, _ in seen] == [None, 1, 2]
    assert seen[0][1] is None
    for (_, prompt), previous in zip(seen[1:], out["masks"][:-1]):
        expected = torch.nn.functional.adaptive_avg_pool3d(previous.detach(), 32).clamp(-20, 20)
        assert torch.equal(prompt, expected)


def test_the_loss_reports_each_samples_mask_loss():
    torch.manual_seed(0)
    labels = torch.zeros(3, 1, 8, 8, 8)
    labels[0, :, 2:5, 2:5, 2:5] = 1
    logits = [torch.randn(3, 1, 8, 8, 8), torch.randn(3, 1, 8, 8, 8)]
    loss_fn = SegmentationLoss(ich_weight=0.0)
    total, parts = loss_fn(logits, None, labels)
    per_sample = parts["sample_mask_loss"]
    assert per_sample.shape == (3,) and not per_sample.requires_grad
    expected = (loss_fn.sample_mask_loss(logits[0], labels) + loss_fn.sample_mask_loss(logits[1], labels)) / 2
    assert torch.allclose(per_sample, expected)
    assert float(total) == pytest.approx(float(per_sample.mean()), rel=1e-6)
    # the crop with blood carries a Dice term on top of its cross-entropy
    assert per_sample[0] > per_sample[1:].max()
