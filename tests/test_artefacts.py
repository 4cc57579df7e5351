"""Streak artefact augmentation (data.artefacts): where bands go, what they leave alone, its place in the loaders."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

import data.artefacts as A
import dataloader as D
from data.lesion_paste import TISSUE_MEDIAN_KEY
from data.transforms import build_transforms
from test_dataloader import add_scan, config, loaders, prep, write_csv

MEDIAN, BONE, AIR = 0.5, 3.0, -4.0


def crop_with_a_bleed(size: int = 24, slice_axis: int = 2) -> dict:
    """Brain at MEDIAN, bone slabs along axis 0, air along axis 1, a labelled 4³ bleed (+1) in the middle."""
    image = torch.full((1, size, size, size), MEDIAN)
    image[0, :4] = MEDIAN + BONE
    image[0, :, :4] = MEDIAN + AIR
    label = torch.zeros(image.shape, dtype=torch.uint8)
    middle = slice(size // 2 - 2, size // 2 + 2)
    image[0, middle, middle, middle] += 1.0
    label[0, middle, middle, middle] = 1
    return {"image": image, "label": label, TISSUE_MEDIAN_KEY: MEDIAN, "slice_axis": slice_axis}


def test_bands_change_head_tissue_only_and_never_the_label():
    streaks = A.RandStreakArtefactd(prob=1.0, intensity_unit=1.0)
    changed_any = 0
    for seed in range(20):
        crop = crop_with_a_bleed()
        streaks.set_random_state(seed)
        out = streaks(crop)
        change = (out["image"] - crop["image"])[0]
        assert torch.equal(out["label"], crop["label"])
        assert torch.all(change[:4] == 0) and torch.all(change[:, :4] == 0)  # bone and air untouched
        assert torch.all(change[:4 + A.STREAK_BONE_CLEARANCE_VOXELS] == 0)  # nor the tissue next to bone
        near_blood = torch.nn.functional.max_pool3d(crop["label"][None].float(), 3, 1, 1)[0, 0] > 0
        assert torch.all(change[near_blood] == 0)  # nor the blood and its one-voxel rim
        # Contrast within the band's range: at most MAX_STREAKS bands of STREAK_HU, in units of ~60 HU.
        assert change.abs().max() <= A.MAX_STREAKS * A.STREAK_HU[1] / A.HEAD_TISSUE_STD_HU + 1e-5
        changed_any += bool(change.abs().max() > 0.1)
    assert changed_any >= 17  # a 17×20 tissue rectangle is crossed almost always


def test_a_band_is_straight_in_the_plane_and_extruded_over_one_run_of_slices(monkeypatch):
    """One band: the slices it touches are one run along the slice axis, each the same in-plane profile scaled by
    its own factor."""
    monkeypatch.setattr(A, "MAX_STREAKS", 1)
    streaks = A.RandStreakArtefactd(prob=1.0, intensity_unit=1.0)
    for slice_axis in (0, 2):
        crop = {"image": torch.full((1, 32, 32, 32), MEDIAN), "label": torch.zeros((1, 32, 32, 32)),
                TISSUE_MEDIAN_KEY: MEDIAN, "slice_axis": slice_axis}
        streaks.set_random_state(3)
        change = (streaks(crop)["image"] - crop["image"])[0].movedim(slice_axis, 0)
        touched = torch.nonzero(change.abs().amax(dim=(1, 2)) > 0).flatten().tolist()
        assert touched and touched == list(range(touched[0], touched[-1] + 1))
        profile = change[touched[0]] / change[touched[0]].abs().max()
        for k in touched:
            np.testing.assert_allclose((change[k] / change[k].abs().max()).numpy(), profile.numpy(), atol=1e-4)
        # Its strong part is one stripe (8-connected) that runs on across the crop, not a blob.
        components, count = ndimage.label((profile.abs() > 0.5).numpy(), structure=np.ones((3, 3)))
        rows, columns = np.nonzero(components)
        assert count == 1 and max(np.ptp(rows), np.ptp(columns)) >= 16


def test_off_means_untouched_and_the_same_seed_the_same_bands():
    crop = crop_with_a_bleed()
    off = A.RandStreakArtefactd(prob=0.0)
    assert torch.equal(off(crop)["image"], crop["image"])
    on = A.RandStreakArtefactd(prob=1.0)
    on.set_random_state(7)
    first = on(crop)["image"]
    on.set_random_state(7)
    assert torch.equal(on(crop)["image"], first) and not torch.equal(first, crop["image"])
    assert torch.equal(crop["image"], crop_with_a_bleed()["image"])  # the input crop is not modified


def test_numpy_crops_and_the_intensity_unit():
    crop = crop_with_a_bleed()
    as_numpy = {**crop, "image": crop["image"].numpy().copy(), "label": crop["label"].numpy().copy()}
    streaks = A.RandStreakArtefactd(prob=1.0, intensity_unit=1.0)
    streaks.set_random_state(1)
    from_tensor = streaks(crop)["image"] - crop["image"]
    streaks.set_random_state(1)
    out = streaks(as_numpy)
    assert isinstance(out["image"], np.ndarray)
    np.testing.assert_allclose(out["image"] - as_numpy["image"], from_tensor.numpy(), atol=1e-6)
    # Twice the unit, twice the contrast (the tissue band about the median widens too; this crop is all in it).
    doubled = A.RandStreakArtefactd(prob=1.0, intensity_unit=2.0)
    doubled.set_random_state(1)
    np.testing.assert_allclose((doubled(crop)["image"] - crop["image"]).numpy(), 2 * from_tensor.numpy(), atol=1e-5)


def test_pipeline_has_the_transform_only_when_asked_for(tmp_path):
    off = build_transforms(prep(input_size=16), tmp_path, 0.75, 0.3)
    on = build_transforms(prep(input_size=16), tmp_path, 0.75, 0.3, streak_augmentation_prob=0.5)
    assert not any(isinstance(t, A.RandStreakArtefactd) for t in off.train_random.transforms)
    assert [t.prob for t in on.train_random.transforms if isinstance(t, A.RandStreakArtefactd)] == [0.5]


def test_loader_adds_bands_to_the_crops_and_keeps_their_labels(tmp_path):
    write_csv(tmp_path / "train.csv", [(add_scan(tmp_path, number, blood), int(blood), f"P{number}")
                                       for number, blood in (("001", True), ("002", False))])
    write_csv(tmp_path / "val.csv", [(add_scan(tmp_path, "003", True), 1, "P3")])
    plain = config(tmp_path, augmentation_prob=0.0)
    cohort = D.validate_cohort(plain)

    def crops(data_config) -> list[dict]:
        train_loader, _ = loaders(data_config, cohort, roi=16, batch=1, seed=0)
        batches = []
        for epoch in range(2):
            D.set_epoch(train_loader, epoch)
            batches += list(train_loader)
        return batches

    without, with_bands = crops(plain), crops(config(tmp_path, augmentation_prob=0.0, streak_augmentation_prob=1.0))
    assert len(without) == len(with_bands) == 4
    for a, b in zip(without, with_bands):
        assert a["case_id"] == b["case_id"] and torch.equal(a["label"], b["label"])  # the same crops, same labels
    assert sum(not torch.equal(a["image"], b["image"]) for a, b in zip(without, with_bands)) >= 3
