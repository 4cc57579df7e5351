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
    at_bone = build_transforms(prep(input_size=16), tmp_path, 0.75, 0.3, lesion_paste_prob=1.0,
                               lesion_paste_at_bone=0.5)
    assert [t.at_bone for t in at_bone.train_random.transforms if isinstance(t, P.RandLesionPasted)] == [0.5]
    # The bank finds bone with the pipeline's own yardstick (one head-tissue standard deviation).
    assert at_bone.lesion_bank.intensity_unit == prep(input_size=16).intensity_unit()


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


# --- Pastes against bone (--lesion_paste_at_bone) ---------------------------------------------------------------

def scan_with_a_crescent_and_a_bleed_inside() -> dict:
    """A 1×32×32×32 cached item: bone slab along axis 0, a 2-voxel-thick plate of blood against it, and a 4³
    bleed in the middle of the brain."""
    image = np.full((1, 32, 32, 32), BRAIN, dtype=np.float32)
    image[0, :4] = BRAIN + BONE
    label = np.zeros(image.shape, dtype=np.uint8)
    for box in ((slice(4, 6), slice(8, 20), slice(8, 20)), (slice(20, 24), slice(20, 24), slice(20, 24))):
        image[0][box] += BLOOD
        label[0][box] = 1
    return {"image": image, "label": label, P.TISSUE_MEDIAN_KEY: BRAIN, "case_id": "s1"}


def test_bank_knows_which_bleeds_lay_against_bone():
    bank = P.LesionBank(intensity_unit=1.0)
    bank.add_items([scan_with_a_crescent_and_a_bleed_inside()])
    assert sorted(lesion.against_bone for lesion in bank.lesions) == [False, True]
    crescent = next(lesion for lesion in bank.lesions if lesion.against_bone)
    assert crescent.contact.sum() >= 12 * 12  # the bone face under the plate
    assert not (crescent.contact & crescent.mask).any()


@pytest.mark.parametrize("bone_side", ["axis 1 high", "axis 0 low", "axis 0 high"])
def test_a_crescent_goes_against_the_crops_bone_facing_it(bone_side):
    bank = P.LesionBank(intensity_unit=1.0)
    bank.add_items([scan_with_a_crescent_and_a_bleed_inside()])
    bank.lesions = [lesion for lesion in bank.lesions if lesion.against_bone]
    axis, high = int(bone_side[5]), bone_side.endswith("high")
    paste = P.RandLesionPasted(bank, prob=1.0, at_bone=1.0)
    for seed in range(6):
        crop = crop_of(median=BRAIN, size=32)
        crop["image"][0] = BRAIN  # only the bone of this test
        bone = torch.zeros((32, 32, 32), dtype=torch.bool)
        bone.narrow(axis, 28 if high else 0, 4).fill_(True)
        crop["image"][0][bone] = BRAIN + BONE
        paste.set_random_state(seed)
        label = paste(crop)["label"][0].bool()
        assert label.sum() >= 40 and not (label & bone).any()
        # Every pasted voxel lies within the plate's 2 voxels of the bone: it was turned and mirrored to face it.
        depth = torch.nonzero(label)[:, axis]
        distance = (27 - depth) if high else (depth - 4)
        assert distance.min() == 0 and distance.max() <= 1


def test_inside_bleeds_and_crops_without_bone_are_placed_as_before():
    bank = P.LesionBank(intensity_unit=1.0)
    bank.add_items([scan_with_a_crescent_and_a_bleed_inside()])
    inside = P.LesionBank(intensity_unit=1.0)
    inside.lesions = [lesion for lesion in bank.lesions if not lesion.against_bone]
    for seed in range(5):
        # A bleed inside the brain: at_bone draws nothing more, so the crop is the one at_bone 0 makes.
        outs = []
        for at_bone in (0.0, 1.0):
            paste = P.RandLesionPasted(inside, prob=1.0, at_bone=at_bone)
            paste.set_random_state(seed)
            outs.append(paste(crop_of())["label"])
        assert torch.equal(*outs)
    crescent_only = P.LesionBank(intensity_unit=1.0)
    crescent_only.lesions = [lesion for lesion in bank.lesions if lesion.against_bone]
    no_bone = crop_of(median=BRAIN, size=32)
    no_bone["image"][0] = BRAIN
    pasted = 0
    for seed in range(5):
        paste = P.RandLesionPasted(crescent_only, prob=1.0, at_bone=1.0)
        paste.set_random_state(seed)
        pasted += int(paste(no_bone)["label"].sum() > 0)
    assert pasted == 5  # no bone in the crop: anywhere, as without the option


def test_at_bone_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="at_bone"):
        P.RandLesionPasted(P.LesionBank(), prob=1.0, at_bone=1.5)


def test_dilation_grows_a_mask_by_a_cube():
    mask = torch.zeros((9, 9, 9), dtype=torch.bool)
    mask[4, 4, 4] = True
    mask[0, 0, 8] = True
    grown = P.dilated(mask, 2)
    expected = np.zeros((9, 9, 9), dtype=bool)
    expected[2:7, 2:7, 2:7] = True
    expected[0:3, 0:3, 6:9] = True
    np.testing.assert_array_equal(grown.numpy(), expected)
    assert torch.equal(P.dilated(mask, 0), mask)
