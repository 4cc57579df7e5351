"""Lesion copy-paste augmentation (data.lesion_paste): the bank, the paste, and its place in the loaders."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import data.lesion_paste as P
from data.transforms import CropIndicesd, build_transforms
import dataloader as D
from test_dataloader import add_scan, config, loaders, prep, write_csv

BRAIN, BLOOD, BONE, AIR = 0.0, 1.0, 3.0, -4.0


def scan_with_bleeds(median: float = BRAIN) -> dict:
    """A 1×24×24×24 cached item: brain at ``median``, a 4³ bleed (+1) and a 2-voxel speck (+1) too small to bank."""
    image = np.full((1, 24, 24, 24), median, dtype=np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    image[0, 4:8, 4:8, 4:8] += BLOOD
    label[0, 4:8, 4:8, 4:8] = 1
    image[0, 20, 20, 20:22] += BLOOD
    label[0, 20, 20, 20:22] = 1
    return {"image": image, "label": label, P.TISSUE_MEDIAN_KEY: median, "case_id": "s1"}


def crop_of(median: float = 0.5, size: int = 20) -> dict:
    """A crop: brain at ``median`` in the middle, bone slabs along axis 0, air along axis 1; no hemorrhage."""
    image = torch.full((1, size, size, size), median)
    image[0, :4] = median + BONE
    image[0, :, :4] = median + AIR
    return {"image": image, "label": torch.zeros(image.shape, dtype=torch.uint8), P.TISSUE_MEDIAN_KEY: median,
            "ich": 0.0, "slice_axis": 2}


def test_bank_holds_each_bleed_with_its_rim_relative_to_its_scan():
    bank = P.LesionBank()
    bank.add_items([scan_with_bleeds(median=2.0), {**scan_with_bleeds(), "label": np.zeros((1, 24, 24, 24))}])
    assert len(bank) == 1  # the speck is under MIN_LESION_VOXELS; the scan without blood adds nothing
    lesion = bank.lesions[0]
    side = 4 + 2 * P.LESION_RIM_VOXELS
    assert lesion.image.shape == lesion.mask.shape == lesion.alpha.shape == (side,) * 3
    assert lesion.mask.sum() == 64
    np.testing.assert_allclose(lesion.image[lesion.mask], BLOOD)  # contrast above its own scan's median (2.0)
    np.testing.assert_allclose(lesion.image[~lesion.mask], 0.0)
    assert np.all(lesion.alpha[lesion.mask] == 1.0)
    rim = lesion.alpha[~lesion.mask]
    assert rim.max() > 0.05 and rim.min() < 1e-3  # a soft edge next to the bleed, nothing far from it


def test_paste_paints_blood_on_tissue_only_and_labels_exactly_what_it_painted():
    bank = P.LesionBank()
    bank.add_items([scan_with_bleeds()])
    paste = P.RandLesionPasted(bank, prob=1.0)
    painted_somewhere, touched_bone = 0, 0
    for seed in range(30):
        crop = crop_of()
        paste.set_random_state(seed)
        out = paste(crop)
        image, label = out["image"][0], out["label"][0].bool()
        assert crop["label"].sum() == 0 and torch.all(crop["image"] == crop_of()["image"])  # input untouched
        if not label.any():
            continue
        painted_somewhere += 1
        assert out["ich"] == 1.0
        # blood is the destination's median plus the bleed's own contrast, wherever the label says so ...
        torch.testing.assert_close(image[label], torch.full_like(image[label], 0.5 + BLOOD))
        # ... and bone and air are never painted or labelled
        assert not label[:4].any() and not label[:, :4].any()
        assert torch.equal(image[:4], crop_of()["image"][0, :4]) and torch.equal(image[:, :4], crop_of()["image"][0, :, :4])
        touched_bone += int(label[4].any())
        # the source's rim is its own brain (its median), so the blend leaves the crop's tissue as it was outside
        # the bleed: contrast is carried relative to each scan's median, not as absolute values
        assert torch.equal(image[~label], crop_of()["image"][0][~label])
    assert painted_somewhere >= 25
    assert touched_bone >= 1  # bleeds land against the bone too, cut by it


def test_paste_is_seeded_and_off_means_untouched():
    bank = P.LesionBank()
    bank.add_items([scan_with_bleeds()])
    paste = P.RandLesionPasted(bank, prob=1.0)
    results = []
    for _ in range(2):
        paste.set_random_state(7)
        results.append(paste(crop_of())["label"])
    assert torch.equal(results[0], results[1]) and results[0].sum() > 0
    never = P.RandLesionPasted(bank, prob=0.0)
    never.set_random_state(7)
    assert never(crop_of())["label"].sum() == 0
    empty = P.RandLesionPasted(P.LesionBank(), prob=1.0)
    assert empty(crop_of())["label"].sum() == 0


def test_paste_can_leave_the_crops_of_negative_scans_alone():
    bank = P.LesionBank()
    bank.add_items([scan_with_bleeds()])
    only_positives = P.RandLesionPasted(bank, prob=1.0, into_negatives=0.0)
    only_positives.set_random_state(7)
    negative = crop_of()
    out = only_positives(negative)
    assert torch.equal(out["image"], negative["image"]) and out["label"].sum() == 0 and out["ich"] == 0.0
    positive = {**crop_of(), "ich": 1.0}
    assert only_positives(positive)["label"].sum() > 0


def test_a_fraction_of_the_negative_crops_gets_a_paste_and_every_positive_one():
    bank = P.LesionBank()
    bank.add_items([scan_with_bleeds()])
    half = P.RandLesionPasted(bank, prob=1.0, into_negatives=0.5)
    half.set_random_state(3)
    negatives = [half(crop_of())["label"].sum() > 0 for _ in range(200)]
    assert 70 <= sum(negatives) <= 130
    assert all(half({**crop_of(), "ich": 1.0})["label"].sum() > 0 for _ in range(20))
    with pytest.raises(ValueError, match="into_negatives must be in \\[0, 1\\], got 1.5"):
        P.RandLesionPasted(bank, prob=1.0, into_negatives=1.5)


def test_paste_works_on_numpy_crops():
    bank = P.LesionBank()
    bank.add_items([scan_with_bleeds()])
    crop = {key: (value.numpy() if isinstance(value, torch.Tensor) else value) for key, value in crop_of().items()}
    paste = P.RandLesionPasted(bank, prob=1.0)
    paste.set_random_state(1)
    out = paste(crop)
    assert isinstance(out["label"], np.ndarray) and out["label"].sum() > 0 and crop["label"].sum() == 0


def test_crop_indices_record_the_tissue_median():
    scan = scan_with_bleeds(median=0.25)
    scan["image"][0, :, :, 12:] = AIR  # air beside the head does not count
    item = CropIndicesd()(scan)
    assert item[P.TISSUE_MEDIAN_KEY] == pytest.approx(0.25)


def test_pipeline_has_a_bank_only_when_asked_for(tmp_path):
    off = build_transforms(prep(input_size=16), tmp_path, 0.75, 0.3)
    on = build_transforms(prep(input_size=16), tmp_path, 0.75, 0.3, lesion_paste_prob=0.5)
    assert off.lesion_bank is None and not any(isinstance(t, P.RandLesionPasted) for t in off.train_random.transforms)
    assert isinstance(on.lesion_bank, P.LesionBank)
    assert any(isinstance(t, P.RandLesionPasted) for t in on.train_random.transforms)


def label_sums(data_config, cohort) -> dict[tuple[int, str], float]:
    """Hemorrhage voxels of every training crop of three epochs, by (epoch, scan)."""
    train_loader, _ = loaders(data_config, cohort, roi=16, batch=1, seed=0)
    sums = {}
    for epoch in range(3):
        D.set_epoch(train_loader, epoch)
        for batch in train_loader:
            sums[epoch, batch["case_id"][0]] = float(batch["label"].sum())
    return sums


def test_loader_fills_the_bank_from_the_training_scans_and_pastes_into_their_crops(tmp_path, monkeypatch):
    cohort_dir = tmp_path
    write_csv(tmp_path / "train.csv", [(add_scan(tmp_path, number, blood), int(blood), f"P{number}")
                                       for number, blood in (("001", True), ("002", False), ("003", True),
                                                             ("004", False))])
    write_csv(tmp_path / "val.csv", [(add_scan(tmp_path, "005", True), 1, "P5")])
    banks = []
    original = P.LesionBank.add_items

    def spy(self, items):
        original(self, items)
        banks.append(self)

    monkeypatch.setattr(P.LesionBank, "add_items", spy)
    plain = config(cohort_dir, positive_crop_fraction=0.0, augmentation_prob=0.0)
    cohort = D.validate_cohort(plain)
    without = label_sums(plain, cohort)
    assert not banks
    with_paste = label_sums(config(cohort_dir, lesion_paste_prob=1.0, positive_crop_fraction=0.0,
                                   augmentation_prob=0.0), cohort)
    assert len(banks) == 1 and len(banks[0]) == 2  # one bleed in each of the two ICH-positive training scans
    assert with_paste.keys() == without.keys()
    # the same crops (the paste comes after the crop) with more blood, unless a bleed landed on too little tissue:
    # in those of the ICH-positive scans 001 and 003 and of the ICH-negative 002 and 004 alike
    gained = {key: with_paste[key] - without[key] for key in without}
    assert all(g >= 0 for g in gained.values())
    for cases in (("001", "003"), ("002", "004")):
        assert sum(g > 0 for key, g in gained.items() if key[1] in cases) >= 4


def test_the_turn_is_about_the_slice_axis_read_from_the_given_key():
    image = np.zeros((1, 24, 24, 24), dtype=np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    image[0, 8:10, 8:10, 6:12] = label[0, 8:10, 8:10, 6:12] = 1  # long along axis 2, square across it
    bank = P.LesionBank()
    bank.add_items([{"image": image, "label": label, P.TISSUE_MEDIAN_KEY: 0.0}])

    def pasted(slice_axis: int, key: str, seed: int) -> torch.Tensor:
        paste = P.RandLesionPasted(bank, prob=1.0, slice_axis_key=key)
        paste.set_random_state(seed)
        crop = {**crop_of(size=24), key: slice_axis}
        return paste(crop)["label"]

    # About axis 2 the turn swaps axes 0 and 1, across which the bleed is square: no turn changes it. About axis 0
    # it swaps 1 and 2, so a turned bleed lies across: some seeds must differ.
    assert any(not torch.equal(pasted(0, "axis_here", s), pasted(2, "axis_here", s)) for s in range(10))
    assert all(torch.equal(pasted(0, "axis_here", s), pasted(0, "slice_axis", s)) for s in range(10))


def test_without_negatives_the_loader_pastes_into_positive_scans_only(tmp_path):
    write_csv(tmp_path / "train.csv", [(add_scan(tmp_path, number, blood), int(blood), f"P{number}")
                                       for number, blood in (("001", True), ("002", False), ("003", True),
                                                             ("004", False))])
    write_csv(tmp_path / "val.csv", [(add_scan(tmp_path, "005", True), 1, "P5")])
    plain = config(tmp_path, positive_crop_fraction=0.0, augmentation_prob=0.0)
    cohort = D.validate_cohort(plain)
    without = label_sums(plain, cohort)
    pasted = label_sums(config(tmp_path, lesion_paste_prob=1.0, lesion_paste_into_negatives=0.0,
                               positive_crop_fraction=0.0, augmentation_prob=0.0), cohort)
    assert pasted.keys() == without.keys()
    assert all(pasted[key] == without[key] == 0 for key in without if key[1] in ("002", "004"))
    assert sum(pasted[key] > without[key] for key in without if key[1] in ("001", "003")) >= 4
