"""prepare_ctich.py on a fake PhysioNet CT-ICH tree in the exact download layout: CSVs the validator accepts, and
every problem of a broken tree named at once."""
from __future__ import annotations

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest

import dataloader
import prepare_ctich
from config import DataConfig
from synthetic import synthesize_scan

SHAPE, SPACING = (48, 48, 10), (2.0, 2.0, 5.0)
POSITIVE = (49, 50, 52, 53, 55, 57, 58, 60)   # PatientNumbers with hemorrhage; 49..60 in all


def save_nifti(array, path, spacing=SPACING, affine=None):
    affine = np.diag([*spacing, 1.0]) if affine is None else affine
    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    nib.save(image, str(path))


def make_tree(root):
    """ct_scans/049.nii (int16 HU), masks/049.nii (0/1, or 0/255 for even numbers), the per-slice label CSV."""
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for number in range(49, 61):
        scan = synthesize_scan(SHAPE, SPACING, np.random.default_rng(number), number in POSITIVE, min_ml=2.0,
                               max_ml=8.0)
        save_nifti(np.rint(scan.image).astype(np.int16), root / "ct_scans" / f"{number:03d}.nii")
        mask = scan.mask.astype(np.uint8) * (255 if number % 2 == 0 else 1)
        save_nifti(mask, root / "masks" / f"{number:03d}.nii")
        for z in range(SHAPE[2]):
            blood = bool(scan.mask[:, :, z].any())
            rows.append({"PatientNumber": number, "SliceNumber": z + 1, "Intraventricular": 0,
                         "Intraparenchymal": int(blood), "Subarachnoid": 0, "Epidural": 0, "Subdural": 0,
                         "No_Hemorrhage": int(not blood), "Fracture_Yes_No": 0})
    with open(root / "hemorrhage_diagnosis_raw_ct.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=prepare_ctich.LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    # The rest of the download, which the conversion leaves alone: per-slice JPEGs and their label table.
    (root / "Patients_CT" / "049" / "brain").mkdir(parents=True)
    (root / "Patients_CT" / "049" / "brain" / "1.jpg").write_bytes(b"\xff\xd8\xff")
    (root / "hemorrhage_diagnosis.csv").write_text("PatientNumber,SliceNumber,Intraventricular\n49,1,0\n")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("ctich") / "download")


def read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_good_tree_becomes_csvs_the_validator_accepts(tree, tmp_path, caplog):
    out = tmp_path / "ctich"
    assert prepare_ctich.main(["--root", str(tree), "--out_dir", str(out), "--folds", "2",
                               "--test_fraction", "0.25"]) == 0
    cohort = read(out / "cohort.csv")
    assert [r["patient_id"] for r in cohort] == [str(n) for n in range(49, 61)]
    assert {int(r["patient_id"]) for r in cohort if r["ich"] == "1"} == set(POSITIVE)
    assert all(r["path"] == str(tree / "ct_scans" / f"{int(r['patient_id']):03d}.nii") for r in cohort)
    mask = nib.load(str(out / "masks" / "050.nii.gz"))   # stored as 0/255 in the download
    assert set(np.unique(np.asanyarray(mask.dataobj))) == {0, 1}
    np.testing.assert_allclose(mask.header.get_zooms()[:3], SPACING)
    assert "0/255 mask, written as 0/1" in caplog.text
    splits_dir = out / "splits"
    for k in (0, 1):
        validated = dataloader.validate_cohort(DataConfig(
            train_csv=str(splits_dir / f"fold_{k}" / "train.csv"), val_csv=str(splits_dir / f"fold_{k}" / "val.csv"),
            mask_dir=str(out / "masks")))
        assert validated.train and validated.val and validated.warnings == []
    held_out = dataloader.validate_cohort(DataConfig(train_csv=str(splits_dir / "test.csv"),
                                                     val_csv=str(splits_dir / "fold_0" / "val.csv"),
                                                     mask_dir=str(out / "masks")))
    assert len(held_out.train) == 3 and held_out.warnings == []
    assert "patients ICH+ small" in (splits_dir / "summary.csv").read_text()


def test_every_problem_of_a_broken_tree_is_named_at_once(tree, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(tree, broken)
    (broken / "ct_scans" / "050.nii").unlink()                                   # labels without an image
    shutil.copy(broken / "ct_scans" / "049.nii", broken / "ct_scans" / "099.nii")  # an image without labels
    shutil.copy(broken / "masks" / "049.nii", broken / "masks" / "098.nii")        # a mask without an image
    save_nifti(np.zeros((48, 40, 10), np.uint8), broken / "masks" / "051.nii")    # wrong shape
    save_nifti(np.full(SHAPE, 2, np.uint8), broken / "masks" / "052.nii")         # not binary
    windowed = np.clip(np.asanyarray(nib.load(str(tree / "ct_scans" / "053.nii")).dataobj), 0, 80) * 3
    save_nifti(windowed.astype(np.int16), broken / "ct_scans" / "053.nii")       # not raw HU
    (broken / "masks" / "055.nii").unlink()                                      # positive without a mask
    (broken / "ct_scans" / "056.nii").write_bytes(b"not a NIfTI file")          # unreadable
    shifted = np.diag([*SPACING, 1.0])
    shifted[:3, 3] = (20.0, 0.0, 0.0)
    save_nifti(np.asanyarray(nib.load(str(tree / "masks" / "057.nii")).dataobj), broken / "masks" / "057.nii",
               affine=shifted)                                                   # right shape, shifted grid
    labels = (broken / "hemorrhage_diagnosis_raw_ct.csv").read_text().splitlines()
    labels[5] = labels[5].rsplit(",", 2)[0] + ",maybe,0"                         # a bad No_Hemorrhage value
    labels.insert(3, "")                                                         # a blank line, counted
    (broken / "hemorrhage_diagnosis_raw_ct.csv").write_text("\n".join(labels) + "\n")

    out = tmp_path / "out"
    assert prepare_ctich.main(["--root", str(broken), "--out_dir", str(out)]) == 1
    log = caplog.text
    assert "problem(s); nothing was written" in log
    for expected in ("PatientNumber 50 has labels but no image", "099.nii: no rows for PatientNumber 99",
                     "098.nii: mask without an image",
                     "051.nii: mask shape (48, 40, 10)", "but the image's shape is (48, 48, 10)",
                     "057.nii: origin (20.00, 0.00, 0.00) mm differs from the image's",
                     "052.nii: mask must be binary", "053.nii: values lie in", "expected raw HU",
                     "055.nii: ICH-positive in hemorrhage_diagnosis_raw_ct.csv but no mask",
                     "056.nii: only 16 bytes",
                     # the file's line (header = line 1, blank line counted), as data.records.Problem numbers rows
                     "row 7: patient 49: No_Hemorrhage must be 0 or 1, got 'maybe'"):
        assert expected in log, expected
    assert "row 4: patient ?" not in log   # the blank line is not a problem
    assert not out.exists()


def test_a_missing_layout_is_reported_whole(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    assert prepare_ctich.main(["--root", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "out")]) == 1
    for expected in ("hemorrhage_diagnosis_raw_ct.csv: label CSV not found", "ct_scans: image folder not found",
                     "masks: mask folder not found"):
        assert expected in caplog.text


def test_a_mask_in_another_orientation_is_written_on_the_image_grid(tree, tmp_path, caplog):
    moved = tmp_path / "moved"
    shutil.copytree(tree, moved)
    stored = np.asanyarray(nib.load(str(tree / "masks" / "049.nii")).dataobj)
    flipped = np.diag([*SPACING, 1.0])
    flipped[0, 0], flipped[0, 3] = -SPACING[0], SPACING[0] * (SHAPE[0] - 1)     # the same voxels in world space
    save_nifti(stored[::-1].copy(), moved / "masks" / "049.nii", affine=flipped)
    out = tmp_path / "out"
    assert prepare_ctich.main(["--root", str(moved), "--out_dir", str(out), "--folds", "2",
                               "--test_fraction", "0.25"]) == 0
    assert "049.nii: brought into the voxel grid of 049.nii (flipped image axis 0)" in caplog.text
    written = nib.load(str(out / "masks" / "049.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), stored)
    validated = dataloader.validate_cohort(DataConfig(
        train_csv=str(out / "splits" / "fold_0" / "train.csv"), val_csv=str(out / "splits" / "fold_0" / "val.csv"),
        mask_dir=str(out / "masks")))
    assert validated.warnings == []


def test_a_positive_mask_off_blood_is_a_warning_that_names_the_train_flag(tree, tmp_path):
    scan = prepare_ctich.Scan("49", "49", 1, SHAPE[2], image=tree / "ct_scans" / "049.nii",
                              mask=tmp_path / "049.nii")
    in_air = np.zeros(SHAPE, np.uint8)
    in_air[:4, :4, :] = 1                                                        # a corner: air, outside the head
    save_nifti(in_air, scan.mask)
    prepare_ctich.inspect_scan(scan)
    assert scan.problems == []
    assert any("does not lie on blood" in w and "--allow_unusual_masks" in w for w in scan.warnings), scan.warnings
