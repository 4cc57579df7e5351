"""Cohort validation, safe loading, geometry, preprocessing, caching, sampling and statistics (dataloader.py and
the data package behind it).

Volumes are tiny hand-built head phantoms (air -1000 HU, a 30 HU brain block, a 70 HU blood block) written in the
user format into tmp_path, and every bad input goes through the public entry points validate_cohort /
load_image_file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import data.budget
import data.cohort
import data.geometry
import data.loaders
import data.transforms
import dataloader as D
from config import DataConfig

SHAPE = (24, 24, 10)
SPACING = (2.0, 2.0, 5.0)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def phantom(shape=SHAPE, blood=True, dtype=np.int16, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(image HU, mask uint8): air, a brain block with some texture, a blood block when ``blood``."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000.0, dtype=np.float32)
    inner = tuple(slice(2, s - 2) for s in shape)
    image[inner] = 30.0 + rng.normal(0, 5, size=image[inner].shape)
    mask = np.zeros(shape, dtype=np.uint8)
    if blood:
        box = tuple(slice(s // 2 - max(1, s // 6), s // 2 + max(1, s // 6)) for s in shape)
        image[box] = 70.0
        mask[box] = 1
    return image.astype(dtype), mask


def write_pkl(path: Path, payload, protocol: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    return path


def write_mask(path: Path, mask: np.ndarray, spacing=SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask, np.diag([*spacing, 1.0])), path)
    return path


def write_csv(path: Path, rows, header="path,ich,patient_id") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return path


def config(tmp_path: Path, **changes) -> DataConfig:
    values = dict(train_csv=str(tmp_path / "train.csv"), val_csv=str(tmp_path / "val.csv"),
                  mask_dir=str(tmp_path / "masks"), cache_dir=str(tmp_path / "cache"),
                  target_spacing=(3.0, 3.0, 3.0), num_workers=0, cache_in_memory=False)
    values.update(changes)
    return DataConfig(**values)


def prep(data_config: DataConfig | None = None, input_size: int = 16, **changes) -> D.Preprocessing:
    """The Preprocessing a run with ``data_config`` (default: ``config(Path("."), **changes)``) builds."""
    return D.Preprocessing.from_config(data_config or config(Path("."), **changes), input_size)


def loaders(data_config: DataConfig, cohort: D.Cohort, roi: int, batch: int, **kwargs):
    return D.build_dataloaders(data_config, prep(data_config, roi), cohort, batch, torch.device("cpu"), **kwargs)


def add_scan(tmp_path: Path, number: str, blood: bool, with_mask: bool | None = None, spacing=SPACING,
             shape=SHAPE) -> Path:
    """An image ``images/<number>.pkl`` with spacing in the pkl, and its mask when ``with_mask`` (default: blood)."""
    image, mask = phantom(shape, blood, seed=int(number))  # distinct content: the cache is keyed by content
    path = write_pkl(tmp_path / "images" / f"{number}.pkl", {"image": image, "spacing": spacing})
    if blood if with_mask is None else with_mask:
        write_mask(tmp_path / "masks" / f"{number}.nii.gz", mask, spacing)
    (tmp_path / "masks").mkdir(exist_ok=True)
    return path


@pytest.fixture
def cohort_dir(tmp_path: Path) -> Path:
    """A valid cohort: train 4 scans (2 ICH+, patient P1 has two), val 2 scans (1 ICH+)."""
    train = [(add_scan(tmp_path, "001", True), 1, "P1"), (add_scan(tmp_path, "002", False), 0, "P1"),
             (add_scan(tmp_path, "003", True), 1, "P2"), (add_scan(tmp_path, "004", False), 0, "P3")]
    val = [(add_scan(tmp_path, "005", True), 1, "P4"), (add_scan(tmp_path, "006", False), 0, "P5")]
    write_csv(tmp_path / "train.csv", train)
    write_csv(tmp_path / "val.csv", val)
    return tmp_path


def problems_of(data_config: DataConfig) -> list[D.Problem]:
    with pytest.raises(D.DataValidationError) as info:
        D.validate_cohort(data_config)
    assert str(info.value).count("\n  - ") == len(info.value.problems)
    return info.value.problems


def only_problem(data_config: DataConfig) -> D.Problem:
    found = problems_of(data_config)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


# ----------------------------------------------------------------------------------------------------------------
# validation: every bad input is reported with file, row and problem
# ----------------------------------------------------------------------------------------------------------------

def test_valid_cohort_passes_and_fills_geometry(cohort_dir):
    cohort = D.validate_cohort(config(cohort_dir))
    assert [c.case_id for c in cohort.train] == ["001", "002", "003", "004"]
    assert [c.case_id for c in cohort.val] == ["005", "006"]
    assert cohort.warnings == []
    first, negative = cohort.train[0], cohort.train[1]
    assert first.mask_path == str(cohort_dir / "masks" / "001.nii.gz") and first.ich == 1
    assert negative.mask_path is None and negative.ich == 0
    assert first.spacing == SPACING and first.spacing_source == "image"
    assert first.row == 2 and first.csv_path == str(cohort_dir / "train.csv")


def test_missing_image_file(cohort_dir):
    write_csv(cohort_dir / "val.csv", [(cohort_dir / "images" / "005.pkl", 1, "P4"),
                                       (cohort_dir / "images" / "077.pkl", 0, "P6")])
    problem = only_problem(config(cohort_dir))
    assert "077.pkl" in str(problem) and "file not found" in str(problem)
    assert problem.row == 3 and "val.csv row 3" in str(problem)


def test_unreadable_pickle(cohort_dir):
    (cohort_dir / "images" / "002.pkl").write_bytes(b"this is not a pickle at all")
    problem = only_problem(config(cohort_dir))
    assert "002.pkl" in problem.file and "not a readable pickle" in problem.message


def test_missing_csv_and_missing_columns_reported_together(cohort_dir):
    write_csv(cohort_dir / "train.csv", [(cohort_dir / "images" / "001.pkl", 1)], header="path,label")
    found = problems_of(config(cohort_dir, val_csv=str(cohort_dir / "nope.csv")))
    text = "\n".join(map(str, found))
    assert "train.csv: missing column(s) ich, patient_id" in text and "found path,label" in text
    assert "nope.csv: val CSV not found" in text


@pytest.mark.parametrize("value", ["2", "yes", ""])
def test_ich_must_be_0_or_1(cohort_dir, value):
    write_csv(cohort_dir / "val.csv", [(cohort_dir / "images" / "005.pkl", 1, "P4"),
                                       (cohort_dir / "images" / "006.pkl", value, "P5")])
    problem = only_problem(config(cohort_dir))
    assert problem.file.endswith("006.pkl") and problem.row == 3
    assert f"ich must be 0 or 1, got {value!r}" in problem.message


def test_duplicate_rows_and_shared_file_numbers(cohort_dir):
    other = add_scan(cohort_dir / "elsewhere", "3", False)  # file number 3 == 003
    rows = [(cohort_dir / "images" / f"00{i}.pkl", int(i in (1, 3)), f"T{i}") for i in (1, 2, 3, 4)]
    write_csv(cohort_dir / "train.csv", rows + [rows[1], (other, 0, "P9")])
    found = problems_of(config(cohort_dir))
    assert len(found) == 2
    assert "duplicate row" in found[0].message and "train.csv row 3" in found[0].message and found[0].row == 6
    assert "file number 3 is also used by" in found[1].message and found[1].file == str(other)


def test_relative_paths_resolve_against_the_csv_folder(cohort_dir, tmp_path, monkeypatch):
    write_csv(cohort_dir / "train.csv", [("images/001.pkl", 1, "P1"), ("./images/002.pkl", 0, "P2")])
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cohort = D.validate_cohort(config(cohort_dir))
    assert [c.image_path for c in cohort.train] == [str(cohort_dir / "images" / "001.pkl"),
                                                   str(cohort_dir / "images" / "002.pkl")]


def test_mask_lookup_by_file_number_ignores_leading_zeros(tmp_path):
    image, mask = phantom()
    write_pkl(tmp_path / "ct" / "049.pkl", {"image": image, "spacing": SPACING})
    write_pkl(tmp_path / "ct" / "7.pkl", {"image": image, "spacing": SPACING})
    write_pkl(tmp_path / "ct" / "scan_b.pkl", {"image": image, "spacing": SPACING})
    write_mask(tmp_path / "masks" / "49.nii.gz", mask)
    write_mask(tmp_path / "masks" / "007.nii", mask)
    write_mask(tmp_path / "masks" / "scan_b.nii", mask)
    write_csv(tmp_path / "train.csv", [(tmp_path / "ct" / "049.pkl", 1, "A"), (tmp_path / "ct" / "7.pkl", 1, "B")])
    write_csv(tmp_path / "val.csv", [(tmp_path / "ct" / "scan_b.pkl", 1, "C")])
    cohort = D.validate_cohort(config(tmp_path))
    assert [Path(c.mask_path).name for c in cohort.train + cohort.val] == ["49.nii.gz", "007.nii", "scan_b.nii"]

    write_mask(tmp_path / "masks" / "049.nii", mask)  # now two masks claim number 49
    problem = only_problem(config(tmp_path))
    assert problem.file.endswith("049.pkl") and "several masks match file number 049" in problem.message
    assert "049.nii" in problem.message and "49.nii.gz" in problem.message


def test_positive_without_mask_is_an_error_negative_without_mask_is_fine(cohort_dir):
    (cohort_dir / "masks" / "003.nii.gz").unlink()
    problem = only_problem(config(cohort_dir))
    assert problem.file.endswith("003.pkl") and problem.row == 4
    assert "ICH-positive scan has no mask" in problem.message and "003.nii.gz" in problem.message
    # The negatives 002/004/006 have no mask file either and are not reported.


def test_ich_label_disagreeing_with_mask_is_a_warning(cohort_dir):
    empty = np.zeros(SHAPE, dtype=np.uint8)
    write_mask(cohort_dir / "masks" / "001.nii.gz", empty)                  # ich=1, empty mask
    write_mask(cohort_dir / "masks" / "002.nii.gz", phantom()[1])           # ich=0, blood in mask
    cohort = D.validate_cohort(config(cohort_dir))
    [warning] = [w for w in cohort.warnings if "disagrees" in w]
    assert "001.pkl: ich=1 but the mask 001.nii.gz is empty" in warning
    assert "002.pkl: ich=0 but the mask 002.nii.gz marks" in warning
    assert len(cohort.train) == 4  # kept, not dropped


def test_patient_leakage_is_an_error_unless_allowed(cohort_dir):
    write_csv(cohort_dir / "val.csv", [(cohort_dir / "images" / "005.pkl", 1, "P2"),
                                       (cohort_dir / "images" / "006.pkl", 0, "P5")])
    problem = only_problem(config(cohort_dir))
    assert problem.file.endswith("005.pkl") and "patient_id 'P2' is also in the train CSV (rows 4)" in problem.message
    assert "allow_patient_overlap" in problem.message
    cohort = D.validate_cohort(config(cohort_dir, allow_patient_overlap=True))
    assert any("both train and val" in w and "P2" in w for w in cohort.warnings)


def test_mask_valued_0_255_is_read_as_binary_with_one_warning(cohort_dir):
    for number in ("001", "003"):
        write_mask(cohort_dir / "masks" / f"{number}.nii.gz", phantom()[1] * np.uint8(255))
    cohort = D.validate_cohort(config(cohort_dir))
    [warning] = [w for w in cohort.warnings if "0/255" in w]
    assert warning.startswith("2 mask(s)") and "001.nii.gz" in warning and "003.nii.gz" in warning
    mask = D.load_mask_file(cohort_dir / "masks" / "001.nii.gz")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}


def test_multilabel_mask_is_an_error_listing_the_values(cohort_dir):
    labels = (np.arange(np.prod(SHAPE)) % 6).reshape(SHAPE).astype(np.uint8)
    write_mask(cohort_dir / "masks" / "003.nii.gz", labels)
    problem = only_problem(config(cohort_dir))
    assert problem.file.endswith("003.nii.gz") and problem.row == 4
    assert "mask must be binary" in problem.message and "found values 0, 1, 2, 3, 4, 5" in problem.message


def test_nan_in_mask_is_an_error(cohort_dir):
    mask = phantom()[1].astype(np.float32)
    mask[0, 0, 0] = np.nan
    write_mask(cohort_dir / "masks" / "001.nii.gz", mask)
    problem = only_problem(config(cohort_dir))
    assert problem.file.endswith("001.nii.gz") and "1 NaN/inf voxel(s)" in problem.message


def test_nonfinite_image_voxels_are_an_error(cohort_dir):
    image = phantom(dtype=np.float32)[0]
    image[1, 2, 3] = np.inf
    image[2, 2, 3] = np.nan
    write_pkl(cohort_dir / "images" / "003.pkl", {"image": image, "spacing": SPACING})
    problem = only_problem(config(cohort_dir))
    assert problem.file.endswith("003.pkl") and "2 non-finite voxel(s)" in problem.message


def test_shape_mismatch_is_an_error_with_both_shapes(cohort_dir):
    write_mask(cohort_dir / "masks" / "001.nii.gz", np.zeros((24, 24, 9), dtype=np.uint8))
    problem = only_problem(config(cohort_dir))
    assert problem.file.endswith("001.nii.gz")
    assert "(24, 24, 9) does not match image shape (24, 24, 10)" in problem.message


def test_every_problem_is_reported_at_once(cohort_dir):
    (cohort_dir / "images" / "002.pkl").write_bytes(b"garbage")
    (cohort_dir / "masks" / "003.nii.gz").unlink()
    write_mask(cohort_dir / "masks" / "005.nii.gz", np.full(SHAPE, 3, dtype=np.uint8))
    write_csv(cohort_dir / "val.csv", [(cohort_dir / "images" / "005.pkl", 1, "P4"),
                                       (cohort_dir / "images" / "006.pkl", 5, "P5")])
    found = problems_of(config(cohort_dir))
    assert [(Path(p.csv).name, p.row) for p in found] == [("train.csv", 3), ("train.csv", 4), ("val.csv", 2),
                                                          ("val.csv", 3)]
    assert ["not a readable pickle" in found[0].message, "no mask" in found[1].message,
            "mask must be binary" in found[2].message, "ich must be 0 or 1" in found[3].message] == [True] * 4


def test_data_that_is_not_raw_hu_is_flagged(cohort_dir):
    image = phantom(dtype=np.float32)[0]
    write_pkl(cohort_dir / "images" / "002.pkl", {"image": (image + 1000) / 1070, "spacing": SPACING})
    write_pkl(cohort_dir / "images" / "004.pkl", {"image": np.clip(image + 100, 0, 255), "spacing": SPACING})
    write_pkl(cohort_dir / "images" / "006.pkl", {"image": np.clip(image, -100, 200), "spacing": SPACING})
    warnings = D.validate_cohort(config(cohort_dir)).warnings
    assert any("002.pkl" in w and "normalised to [0, 1]" in w for w in warnings)
    assert any("004.pkl" in w and "8-bit windowed" in w for w in warnings)
    assert any("006.pkl" in w and "no voxel below -500 HU" in w for w in warnings)


# ----------------------------------------------------------------------------------------------------------------
# safe loading
# ----------------------------------------------------------------------------------------------------------------

class _Hostile:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Arbitrary:
    pass


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, cohort_dir):
    side_effect = tmp_path / "pwned"
    payload = {"image": phantom()[0], "spacing": SPACING, "x": _Hostile(f"touch {side_effect}")}
    path = write_pkl(tmp_path / "evil.pkl", payload)
    with pytest.raises(D.UnsafePickleError) as info:
        D.load_image_file(path)
    assert str(path) in str(info.value) and f"{os.system.__module__}.system" in str(info.value)
    assert "nothing in it was run" in str(info.value)
    assert not side_effect.exists()

    # Same through the cohort entry point.
    write_pkl(cohort_dir / "images" / "004.pkl", payload, protocol=2)
    problem = only_problem(config(cohort_dir))
    assert problem.file.endswith("004.pkl") and "refused to unpickle" in problem.message
    assert not side_effect.exists()


def test_arbitrary_classes_are_refused(tmp_path):
    path = write_pkl(tmp_path / "obj.pkl", {"image": phantom()[0], "meta": _Arbitrary()})
    with pytest.raises(D.UnsafePickleError, match=r"obj\.pkl: refused .*_Arbitrary"):
        D.load_image_file(path)
    path = write_pkl(tmp_path / "tensor.pkl", {"image": torch.zeros(3, 3, 3)})
    with pytest.raises(D.UnsafePickleError, match=r"tensor\.pkl: refused .*torch"):
        D.load_image_file(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles_of_arrays_and_dicts_load_across_protocols(tmp_path, protocol):
    image = phantom(dtype=np.int16)[0]
    spacing = (np.float64(0.45), np.float32(0.45), 5)
    path = write_pkl(tmp_path / "a.pkl", {"ct": image, "spacing": spacing}, protocol=protocol)
    volume, meta = D.load_image_file(path)
    assert volume.dtype == np.float32 and volume.flags.writeable
    np.testing.assert_array_equal(volume, image.astype(np.float32))
    assert meta["spacing"] == pytest.approx((0.45, 0.45, 5.0))
    bare = write_pkl(tmp_path / "b.pkl", image.astype(np.float64), protocol=protocol)
    volume, meta = D.load_image_file(bare)
    assert volume.shape == SHAPE and meta == {"spacing": None, "affine": None}


def test_numpy_1x_module_names_are_accepted(tmp_path):
    image = phantom()[0]
    raw = pickle.dumps({"image": image}, protocol=2)
    assert b"numpy._core.multiarray" in raw  # numpy >= 2 writes the new name
    path = tmp_path / "old.pkl"
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    np.testing.assert_array_equal(D.load_image_file(path)[0], image)


def test_affine_in_pkl_gives_spacing(tmp_path):
    affine = np.diag([0.5, 0.6, 4.0, 1.0])
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # rotated axes
    _, meta = D.load_image_file(write_pkl(tmp_path / "a.pkl", {"volume": phantom()[0], "affine": affine}))
    assert meta["spacing"] == pytest.approx((0.6, 0.5, 4.0))


def test_npy_npz_and_nifti_images(tmp_path):
    image = phantom(dtype=np.float32)[0]
    np.save(tmp_path / "a.npy", image)
    np.testing.assert_array_equal(D.load_image_file(tmp_path / "a.npy")[0], image)
    np.savez(tmp_path / "b.npz", image=image, spacing=np.array(SPACING))
    assert D.load_image_file(tmp_path / "b.npz")[1]["spacing"] == SPACING
    nib.save(nib.Nifti1Image(image, np.diag([0.7, 0.8, 3.0, 1.0])), tmp_path / "c.nii.gz")
    volume, meta = D.load_image_file(tmp_path / "c.nii.gz")
    np.testing.assert_array_equal(volume, image)
    assert meta["spacing"] == pytest.approx((0.7, 0.8, 3.0))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(D.VolumeLoadError, match=r"obj\.npy: not a readable \.npy"):
        D.load_image_file(tmp_path / "obj.npy")


@pytest.mark.parametrize("payload, message", [
    (np.zeros((24, 24), dtype=np.int16), "3-D volume, got a 2-D array of shape (24, 24) (a single slice?"),
    (np.zeros((2, 2, 2), dtype=bool), "dtype bool (boolean)"),
    (np.zeros((2, 2, 2), dtype=np.complex64), "dtype complex64 (complex)"),
    (np.array([[["a"]]], dtype=object), "dtype object (Python object)"),
    (np.array([[["ab"]]]), "dtype <U2 (string)"),
    (np.full((3, 3, 3), 40, dtype=np.int16), "constant volume: every voxel is 40"),
    (np.zeros((0, 4, 4), dtype=np.float32), "empty volume of shape (0, 4, 4)"),
    ({"pixels": np.zeros((2, 2, 2))}, "dict without an image"),
    ({"image": np.ones((3, 3, 3)), "img": np.ones((3, 3, 3))}, "several image keys"),
    ({"image": [1, 2, 3]}, "'image' holds a list, expected a numpy array"),
    ([np.zeros((2, 2, 2))], "holds a list; expected a numpy array or a dict"),
    ({"image": np.arange(27.0).reshape(3, 3, 3), "spacing": (1.0, 0.0, 2.0)}, "'spacing' must be 3 positive"),
])
def test_bad_arrays_are_refused_with_a_clear_message(tmp_path, payload, message):
    path = write_pkl(tmp_path / "bad.pkl", payload)
    with pytest.raises(D.VolumeLoadError) as info:
        D.load_image_file(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------------

def test_spacing_from_pkl_then_mask_header_then_fallback(tmp_path):
    image, mask = phantom()
    write_pkl(tmp_path / "ct" / "001.pkl", {"image": image, "spacing": (1.0, 1.0, 3.0)})
    write_mask(tmp_path / "masks" / "001.nii.gz", mask, spacing=(1.0, 1.0, 3.0))
    write_pkl(tmp_path / "ct" / "002.pkl", image)                             # bare array, mask has spacing
    write_mask(tmp_path / "masks" / "002.nii.gz", mask, spacing=(0.5, 0.6, 4.0))
    write_pkl(tmp_path / "ct" / "003.pkl", {"img": image})                    # no spacing anywhere
    nib.save(nib.Nifti1Image(mask, None), tmp_path / "masks" / "003.nii")    # header without geometry
    write_csv(tmp_path / "train.csv", [(tmp_path / "ct" / f"00{i}.pkl", 1, f"P{i}") for i in (1, 2, 3)])
    write_csv(tmp_path / "val.csv", [(write_pkl(tmp_path / "ct" / "004.pkl", {"image": image, "spacing": SPACING}),
                                      0, "P4")])
    cohort = D.validate_cohort(config(tmp_path, spacing=(0.9, 0.9, 2.5)))
    spacing = [(c.spacing, c.spacing_source) for c in cohort.train]
    assert spacing == [((1.0, 1.0, 3.0), "image"), (pytest.approx((0.5, 0.6, 4.0)), "mask_header"),
                       ((0.9, 0.9, 2.5), "fallback")]
    [warning] = [w for w in cohort.warnings if "fallback" in w]
    assert warning.startswith("1 scan(s)") and "003.pkl" in warning and "(0.9, 0.9, 2.5)" in warning


def test_axis_permuted_mask_is_transposed_with_a_warning(tmp_path):
    image, mask = phantom(shape=(10, 24, 20))
    write_pkl(tmp_path / "ct" / "001.pkl", {"image": image})
    permuted = np.ascontiguousarray(mask.transpose(1, 2, 0))                 # 24×20×10, slice axis last
    write_mask(tmp_path / "masks" / "001.nii.gz", permuted, spacing=(2.0, 2.5, 5.0))
    write_csv(tmp_path / "train.csv", [(tmp_path / "ct" / "001.pkl", 1, "P1")])
    write_csv(tmp_path / "val.csv", [(write_pkl(tmp_path / "ct" / "002.pkl", {"image": image, "spacing": SPACING}),
                                      0, "P2")])
    cohort = D.validate_cohort(config(tmp_path))
    case = cohort.train[0]
    assert case.mask_axes == (2, 0, 1)
    assert case.spacing == pytest.approx((5.0, 2.0, 2.5)) and case.spacing_source == "mask_header"
    [warning] = [w for w in cohort.warnings if "transposed" in w]
    assert "001.nii.gz" in warning and "(24, 20, 10)" in warning and "(10, 24, 20)" in warning
    # The transposed mask is what the loader serves: blood where the image has blood.
    _, val_loader = loaders(config(tmp_path), D.Cohort(train=cohort.train, val=cohort.train, warnings=[]), 16, 1,
                            seed=0)
    batch = next(iter(val_loader))
    blood = batch["label"][0, 0] > 0
    assert blood.any() and batch["image"][0, 0][blood].mean() > batch["image"][0, 0][~blood].mean() + 0.5


def test_find_mask_and_load_mask_file_for_single_scans(tmp_path):
    image, mask = phantom(shape=(10, 24, 20))
    write_mask(tmp_path / "masks" / "12.nii.gz", np.ascontiguousarray(mask.transpose(1, 2, 0)), (1.0, 2.0, 5.0))
    found = D.find_mask(tmp_path / "ct" / "012.pkl", tmp_path / "masks")
    assert found == tmp_path / "masks" / "12.nii.gz"
    assert D.find_mask(tmp_path / "ct" / "013.pkl", tmp_path / "masks") is None
    np.testing.assert_array_equal(D.load_mask_file(found, expected_shape=image.shape), mask)
    assert D.mask_header_spacing(found) == (1.0, 2.0, 5.0)
    with pytest.raises(D.VolumeLoadError, match=r"12\.nii\.gz: mask shape \(24, 20, 10\) does not match image "
                                                r"shape \(10, 24, 21\)"):
        D.load_mask_file(found, expected_shape=(10, 24, 21))
    with pytest.raises(D.VolumeLoadError, match="mask_dir is not a folder"):
        D.find_mask(tmp_path / "ct" / "012.pkl", tmp_path / "nowhere")


# Issue 14, item 2: a mask whose header puts it elsewhere than its image (flipped, swapped, shifted) or that does not
# lie on blood is caught before training; one that is merely stored in another orientation is brought into the
# image's grid, and the cache serves it that way.

IMAGE_AFFINE = np.array([[2.0, 0, 0, -20.0], [0, 2.0, 0, -30.0], [0, 0, 5.0, 10.0], [0, 0, 0, 1.0]])


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def off_centre_phantom(shape=(24, 20, 10)) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) with the blood in one corner of the brain: any flip or swap of the mask moves it."""
    image, _ = phantom(shape, blood=False)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[3:8, 4:10, 3:6] = 1
    image[mask > 0] = 70
    return image, mask


def nifti_case(tmp_path: Path, mask_data: np.ndarray, mask_affine: np.ndarray, shape=(24, 20, 10)
               ) -> tuple[np.ndarray, np.ndarray]:
    """ICH-positive NIfTI scan 001 (IMAGE_AFFINE; blood as in ``off_centre_phantom``) with the given mask file; a
    negative pkl scan in val. Returns the (image, true mask) in the image's grid."""
    image, truth = off_centre_phantom(shape)
    write_nifti(tmp_path / "ct" / "001.nii.gz", image, IMAGE_AFFINE)
    write_nifti(tmp_path / "masks" / "001.nii.gz", mask_data, mask_affine)
    write_csv(tmp_path / "train.csv", [(tmp_path / "ct" / "001.nii.gz", 1, "P1")])
    write_csv(tmp_path / "val.csv", [(write_pkl(tmp_path / "ct" / "002.pkl", {"image": image, "spacing": SPACING}),
                                      0, "P2")])
    return image, truth


def served_label(data_config: DataConfig, cohort: D.Cohort) -> np.ndarray:
    """The label the (uncached, then cached) loader serves for the first training case, at 3 mm."""
    _, val_loader = loaders(data_config, D.Cohort(train=cohort.train, val=cohort.train, warnings=[]), 16, 1, seed=0)
    return next(iter(val_loader))["label"][0, 0].numpy()


def test_mask_flipped_in_its_affine_is_brought_into_the_image_grid(tmp_path):
    flipped_affine = IMAGE_AFFINE.copy()
    flipped_affine[:3, 0] *= -1
    flipped_affine[:3, 3] = IMAGE_AFFINE[:3, 3] + IMAGE_AFFINE[:3, 0] * 23   # voxel 0 of the mask is voxel 23
    image, truth = nifti_case(tmp_path, np.ascontiguousarray(off_centre_phantom()[1][::-1]), flipped_affine)
    cohort = D.validate_cohort(config(tmp_path))
    case = cohort.train[0]
    assert (case.mask_axes, case.mask_flips) == ((0, 1, 2), (1, 0, 0))
    [warning] = [w for w in cohort.warnings if "orientation" in w]
    assert "001.nii.gz" in warning and "flipped image axis 0" in warning
    expected = D.resample_to_shape(truth[None], served_label(config(tmp_path), cohort).shape, "nearest")[0]
    np.testing.assert_array_equal(served_label(config(tmp_path), cohort), expected)


def test_equal_size_axes_swapped_in_the_affine_are_caught(tmp_path):
    truth = off_centre_phantom((20, 20, 10))[1]
    swapped_affine = IMAGE_AFFINE[:, [1, 0, 2, 3]]
    nifti_case(tmp_path, np.ascontiguousarray(truth.transpose(1, 0, 2)), swapped_affine, shape=(20, 20, 10))
    cohort = D.validate_cohort(config(tmp_path))
    assert cohort.train[0].mask_axes == (1, 0, 2)
    assert any("orientation" in w and "axes (1, 0, 2)" in w for w in cohort.warnings)
    label = served_label(config(tmp_path), cohort)
    np.testing.assert_array_equal(label, D.resample_to_shape(truth[None], label.shape, "nearest")[0])


@pytest.mark.parametrize("change, message", [
    ("shift", "is shifted by (30.00, 0.00, 0.00) mm (30.0 mm)"),
    ("spacing", "voxel size (2.40, 2.00, 5.00) mm differs from the image's (2.00, 2.00, 5.00) mm"),
])
def test_mask_off_the_image_grid_is_an_error_unless_allowed(tmp_path, change, message):
    affine = IMAGE_AFFINE.copy()
    if change == "shift":
        affine[0, 3] += 30.0
    else:
        affine[0, 0] = 2.4
    nifti_case(tmp_path, off_centre_phantom()[1], affine)
    problem = only_problem(config(tmp_path))
    assert problem.file.endswith("001.nii.gz") and problem.row == 2
    assert message in problem.message and "--allow_unusual_masks" in problem.message
    cohort = D.validate_cohort(config(tmp_path, allow_unusual_masks=True))
    assert any(message in w and "voxel for voxel" in w for w in cohort.warnings)


@pytest.mark.parametrize("place, message", [
    ("air", "% of its voxels are air (< -200 HU), i.e. outside the head"),
    ("bone", "% of its voxels are bone (> 300 HU)"),
    ("brain", "its median is 20 HU where blood is 30-100 HU"),
])
def test_mask_that_does_not_lie_on_blood_is_an_error_unless_allowed(cohort_dir, place, message):
    # A pkl image carries no affine, so nothing but its HU can tell a mask of another scan or orientation.
    image, mask = phantom(seed=1)
    moved = np.zeros_like(mask)
    if place == "air":
        moved[0:2, 0:6, 0:3] = 1
    elif place == "bone":
        image[2:4, 2:8, 2:5] = 1500
        moved[2:4, 2:8, 2:5] = 1
    else:
        image = np.where(mask > 0, 20, image).astype(image.dtype)  # the labelled box holds no blood
        moved = mask
    write_pkl(cohort_dir / "images" / "001.pkl", {"image": image, "spacing": SPACING})
    write_mask(cohort_dir / "masks" / "001.nii.gz", moved)
    problem = only_problem(config(cohort_dir))
    assert problem.file.endswith("001.nii.gz") and problem.row == 2
    assert message in problem.message and "--allow_unusual_masks" in problem.message
    warnings = D.validate_cohort(config(cohort_dir, allow_unusual_masks=True)).warnings
    assert any("001.nii.gz" in w and "does not lie on blood" in w for w in warnings)


def test_nifti_image_stored_with_a_trailing_singleton_axis_is_accepted(tmp_path):
    image = phantom(dtype=np.float32)[0]
    write_nifti(tmp_path / "a.nii.gz", image[..., None], np.diag([*SPACING, 1.0]))
    volume, meta = D.load_image_file(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(volume, image)
    assert meta["spacing"] == SPACING


def test_torch_tensor_saved_as_pkl_is_refused_to_unpickle(tmp_path):
    tensor = torch.from_numpy(phantom(dtype=np.float32)[0])
    zipped, legacy = tmp_path / "zip.pkl", tmp_path / "legacy.pkl"
    torch.save(tensor, zipped)
    torch.save(tensor, legacy, _use_new_zipfile_serialization=False)
    for path in (zipped, legacy):
        with pytest.raises(D.UnsafePickleError, match="refused to unpickle: .*torch.save file"):
            D.load_image_file(path)


def test_scan_without_head_voxels_is_a_validation_error(cohort_dir):
    # Nothing above the -100 HU window floor: the zscore normalisation has no head to take statistics from.
    air = np.full(SHAPE, -1000, dtype=np.int16)
    air[5:10, 5:10, 2:4] = -600
    write_pkl(cohort_dir / "images" / "004.pkl", {"image": air, "spacing": SPACING})
    problem = only_problem(config(cohort_dir))
    assert problem.file.endswith("004.pkl") and problem.row == 5
    assert "needs voxels above -100 HU (the head); found 0" in problem.message


def test_csv_rows_are_the_lines_editors_show(cohort_dir):
    (cohort_dir / "val.csv").write_text(f"path,ich,patient_id\n{cohort_dir / 'images' / '005.pkl'},1,P4\n\n"
                                        f"{cohort_dir / 'images' / '006.pkl'},7,P5\n")
    problem = only_problem(config(cohort_dir))
    assert problem.row == 4 and "val.csv row 4" in str(problem)   # line 3 is blank, line 1 the header


def test_data_warnings_are_returned_not_logged(cohort_dir, caplog):
    # train.py logs Cohort.warnings once (rank 0); validate_cohort logging them too printed each twice.
    write_mask(cohort_dir / "masks" / "001.nii.gz", phantom(seed=1)[1] * 255)
    cohort = D.validate_cohort(config(cohort_dir))
    assert any("0/255" in w for w in cohort.warnings) and "0/255" not in caplog.text


# Issue 14, item 10: sizes before work.

def test_settings_that_cannot_fit_are_refused_with_the_numbers(tmp_path, monkeypatch):
    image, mask = phantom((64, 64, 16))
    write_pkl(tmp_path / "images" / "001.pkl", {"image": image, "spacing": (1.5, 1.5, 4.0)})
    write_mask(tmp_path / "masks" / "001.nii.gz", mask, (1.5, 1.5, 4.0))
    write_csv(tmp_path / "train.csv", [(tmp_path / "images" / "001.pkl", 1, "P1")])
    write_csv(tmp_path / "val.csv", [(add_scan(tmp_path, "002", False), 0, "P2")])
    monkeypatch.setattr(data.budget, "available_memory_bytes", lambda: 8 * 2**30)
    problem = only_problem(config(tmp_path, target_spacing=(0.1, 0.1, 0.1)))
    assert problem.file.endswith("001.pkl") and "becomes 960×960×640 voxels (2.7 GB cached)" in problem.message
    assert "8.0 GB is available" in problem.message and "coarser --target_spacing" in problem.message

    monkeypatch.setattr(data.budget, "free_disk_bytes", lambda folder: 0)
    [problem] = problems_of(config(tmp_path))
    assert problem.file == str(tmp_path / "cache") and "the preprocessed cache needs about" in problem.message
    assert "has 0 MB free" in problem.message


@pytest.mark.parametrize("suffix", [".npy", ".nii.gz"])
def test_huge_files_are_sized_from_their_headers_not_read(tmp_path, monkeypatch, suffix):
    image = phantom((64, 64, 32), dtype=np.float32)[0]
    path = tmp_path / "images" / f"001{suffix}"
    path.parent.mkdir(parents=True)
    if suffix == ".npy":
        np.save(path, image)
    else:
        write_nifti(path, image, np.diag([*SPACING, 1.0]))
    write_csv(tmp_path / "train.csv", [(path, 0, "P1")])
    write_csv(tmp_path / "val.csv", [(add_scan(tmp_path, "002", False), 0, "P2")])
    monkeypatch.setattr(data.budget, "available_memory_bytes", lambda: 2**20)
    reads = []
    real_read = data.cohort.read_image
    monkeypatch.setattr(data.cohort, "read_image", lambda p, **kw: reads.append(p) or real_read(p, **kw))
    found = problems_of(config(tmp_path))
    mine = [p for p in found if p.file == str(path)]
    assert mine and "a 64×64×32 array of" in mine[0].message and "1 MB is available" in mine[0].message
    assert path not in reads


def test_volumes_far_smaller_than_the_model_input_are_warned(cohort_dir, caplog):
    data_config = config(cohort_dir, target_spacing=(20.0, 20.0, 20.0))
    cohort = D.validate_cohort(data_config)
    loaders(data_config, cohort, 64, 2, seed=0)
    assert "preprocessed volumes are tiny (typically 2×2×3 voxels) next to the model's 64³ input" in caplog.text


def test_matching_axes():
    assert D.matching_axes((30, 512, 512), (512, 512, 30)) == (2, 0, 1)
    assert D.matching_axes((512, 30, 400), (400, 512, 30)) == (1, 2, 0)
    assert D.matching_axes((4, 5, 6), (4, 5, 6)) == (0, 1, 2)
    assert D.matching_axes((4, 5, 6), (4, 5, 7)) is None


# ----------------------------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------------------------

def test_preprocess_windows_and_zscores_inside_the_head():
    image = phantom(dtype=np.float32)[0]
    image[3, 3, 3] = 1500.0   # bone is saturated by the window
    out = D.preprocess_image(image, SPACING, prep(target_spacing=SPACING))
    assert out.shape == (1, *SHAPE) and out.dtype == np.float32
    inside = np.clip(image, -100, 200) > -100
    assert out[0][inside].mean() == pytest.approx(0.0, abs=1e-4)
    assert out[0][inside].std() == pytest.approx(1.0, abs=1e-3)
    assert out[0, 3, 3, 3] == out[0][inside].max()
    minmax = D.preprocess_image(image, SPACING, prep(target_spacing=SPACING, normalization="minmax"))
    assert minmax.min() == 0.0 and minmax.max() == 1.0
    raw = D.preprocess_image(image, SPACING, prep(target_spacing=SPACING, normalization="none"))
    assert raw.min() == -100.0 and raw.max() == 200.0
    with pytest.raises(ValueError, match="unknown normalization 'robust'; expected one of zscore, minmax, none"):
        prep(normalization="robust")
    with pytest.raises(ValueError, match="pipeline version 2; this code implements version 1"):
        D.preprocess_image(image, SPACING, dataclasses.replace(prep(), pipeline_version=2))


def test_preprocess_resamples_to_target_spacing_and_keeps_image_and_mask_aligned():
    image, mask = phantom(shape=(40, 36, 12), dtype=np.float32)
    spacing = (0.9, 1.1, 5.0)
    out = D.preprocess_image(image, spacing, prep(target_spacing=(1.5, 1.5, 1.5)))
    expected = D.preprocessed_shape(image.shape, spacing, (1.5, 1.5, 1.5))
    assert expected == (24, 26, 40) and out.shape == (1, *expected)
    label = D.resample_to_shape(mask[None], expected, "nearest")
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
    # Same physical centre of the blood block in image (bright voxels) and label.
    bright = np.argwhere(out[0] > out[0].max() - 0.3).mean(axis=0)
    assert np.abs(bright - np.argwhere(label[0]).mean(axis=0)).max() < 0.6
    # Maps back onto the original grid (what predict.py does).
    back = D.resample_to_shape(label[0], mask.shape, "nearest")
    assert back.shape == mask.shape and (back == mask).mean() > 0.97


def test_preprocessing_round_trips_as_plain_data():
    settings = prep(input_size=64, hu_window=(-50.0, 150.0), normalization="minmax", target_spacing=(2.0, 2.0, 3.0))
    raw = settings.to_dict()
    assert raw == {"hu_window": [-50.0, 150.0], "normalization": "minmax", "target_spacing": [2.0, 2.0, 3.0],
                   "input_size": 64, "pipeline_version": D.PIPELINE_VERSION}
    assert D.Preprocessing.from_dict(json.loads(json.dumps(raw))) == settings
    old_export = {k: v for k, v in raw.items() if k != "pipeline_version"}   # sam_encoder.pth before the version
    assert D.Preprocessing.from_dict(old_export).pipeline_version == 1
    with pytest.raises(ValueError, match="unknown preprocessing settings spacing"):
        D.Preprocessing.from_dict({**raw, "spacing": [1, 1, 1]})
    with pytest.raises(ValueError, match="hu_window needs low < high"):
        prep(hu_window=(200.0, -100.0))
    with pytest.raises(dataclasses.FrozenInstanceError):   # built once, never changed on the way
        settings.hu_window = (0.0, 1.0)


def test_cache_key_changes_with_every_setting_that_shapes_the_volume():
    case = D.Case(image_path="a.pkl", mask_path=None, ich=0, patient_id="P", case_id="a", csv_path="t.csv", row=1,
                  spacing=(1.0, 1.0, 5.0), spacing_source="image", fingerprint="f" * 32)
    base = prep(input_size=128)
    key = D.cache_key(case, base)
    # Same layout as before Preprocessing existed: existing cache entries stay valid.
    recipe = {"pipeline_version": 1, "content": "f" * 32, "spacing": [1.0, 1.0, 5.0], "mask_axes": [0, 1, 2],
              "hu_window": [-100.0, 200.0], "normalization": "zscore", "target_spacing": [3.0, 3.0, 3.0]}
    assert key == hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:40]
    changed = {"hu_window": (-50.0, 200.0), "normalization": "minmax", "target_spacing": (3.0, 3.0, 2.0),
               "pipeline_version": 2}
    assert set(changed) | {"input_size"} == {f.name for f in dataclasses.fields(D.Preprocessing)}
    for field, value in changed.items():
        assert D.cache_key(case, dataclasses.replace(base, **{field: value})) != key, field
    for field, value in {"spacing": (1.0, 1.0, 2.5), "fingerprint": "e" * 32, "mask_axes": (2, 0, 1),
                         "mask_flips": (1, 0, 0)}.items():
        assert D.cache_key(dataclasses.replace(case, **{field: value}), base) != key, field
    # The crop size only sizes crops taken from the cached volume: a tiny and a turbo run share the entry.
    assert D.cache_key(case, dataclasses.replace(base, input_size=64)) == key


def test_resample_to_shape_accepts_tensors_and_checks_arguments():
    volume = torch.rand(1, 8, 8, 8)
    out = D.resample_to_shape(volume, (4, 12, 8), "linear")
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 12, 8) and out.dtype == torch.float32
    assert D.resample_to_shape(torch.ones(8, 8, 8), (3, 3, 3)).shape == (3, 3, 3)
    with pytest.raises(ValueError, match="mode must be 'linear' or 'nearest'"):
        D.resample_to_shape(volume, (4, 4, 4), "cubic")


# ----------------------------------------------------------------------------------------------------------------
# cache, batches, sampling, reproducibility
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def load_spy(monkeypatch):
    calls: list[str] = []
    real = D.load_image_file

    def spy(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(data.transforms, "load_image_file", spy)  # what LoadPreprocessd calls
    return calls


def _run_epochs(data_config, cohort, epochs=2, seed=0, roi=16, batch=2):
    train, val = loaders(data_config, cohort, roi, batch, seed=seed)
    out = []
    for epoch in range(epochs):
        D.set_epoch(train, epoch)
        out.append([b for b in train])
    return out, [b for b in val]


def test_cache_is_reused_and_invalidated_by_preprocessing_parameters(cohort_dir, load_spy):
    data_config = config(cohort_dir)
    cohort = D.validate_cohort(data_config)
    _run_epochs(data_config, cohort)
    assert sorted(load_spy) == sorted(c.image_path for c in cohort.train + cohort.val)  # each raw scan once
    entries = sorted((cohort_dir / "cache").glob("*.npz"))
    assert len(entries) == 6

    _run_epochs(data_config, cohort)                                       # new loaders, disk cache
    _run_epochs(config(cohort_dir, cache_in_memory=True), cohort)          # RAM cache filled from disk
    assert len(load_spy) == 6

    _run_epochs(config(cohort_dir, hu_window=(-50.0, 150.0)), cohort, epochs=1)
    assert len(load_spy) == 12
    _run_epochs(config(cohort_dir, target_spacing=(4.0, 4.0, 4.0)), cohort, epochs=1)
    assert len(load_spy) == 18 and len(list((cohort_dir / "cache").glob("*.npz"))) == 18


def test_train_and_val_batches(cohort_dir):
    data_config = config(cohort_dir)
    cohort = D.validate_cohort(data_config)
    (epoch,), val = _run_epochs(data_config, cohort, epochs=1, roi=16, batch=3)
    assert [len(b["case_id"]) for b in epoch] == [3, 1]  # the short last batch is kept
    for batch in epoch:
        size = len(batch["case_id"])
        assert set(batch) == {"image", "label", "ich", "case_id"}
        assert batch["image"].shape == (size, 1, 16, 16, 16) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (size, 1, 16, 16, 16) and batch["label"].dtype == torch.float32
        assert set(batch["label"].unique().tolist()) <= {0.0, 1.0}
        assert batch["ich"].shape == (size,) and batch["ich"].dtype == torch.float32
        assert all(isinstance(c, str) for c in batch["case_id"])
    assert sorted(sum((b["case_id"] for b in epoch), [])) == ["001", "002", "003", "004"]
    target = D.preprocessed_shape(SHAPE, SPACING, (3.0, 3.0, 3.0))
    assert [b["case_id"] for b in val] == [["005"], ["006"]]
    for batch in val:
        assert batch["image"].shape == (1, 1, *target) and batch["label"].shape == (1, 1, *target)
        assert batch["ich"].shape == (1,)
    assert val[0]["label"].sum() > 0 and val[1]["label"].sum() == 0


def _head_phantom() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((1, 64, 64, 64), -2.0, dtype=np.float32)
    image[:, 6:58, 6:58, 6:58] = 0.5                     # the head
    label = np.zeros((1, 64, 64, 64), dtype=np.uint8)
    label[:, 30:34, 30:34, 30:34] = 1                    # 64 blood voxels of 140k head voxels
    return image, label


def test_crop_indices_are_computed_once_and_stored_compactly():
    image, label = _head_phantom()
    item = D.CropIndicesd()({"image": image, "label": label, "case_id": "x"})
    blood, head = item["label_fg_indices"], item["label_bg_indices"]
    assert blood.dtype == head.dtype == np.int32
    np.testing.assert_array_equal(blood, np.flatnonzero(label[0]))
    np.testing.assert_array_equal(head, np.flatnonzero((image[0] > -2.0) & (label[0] == 0)))
    assert item["air"] == -2.0
    # Beyond the cap, every k-th head voxel in raster order is kept (spread over the whole head).
    thinned = D.CropIndicesd(max_head_indices=1000)({"image": image, "label": label})["label_bg_indices"]
    assert len(thinned) <= 1000 and set(thinned) <= set(head)
    assert np.ptp(np.unravel_index(thinned, label.shape[1:])[0]) > 40
    # A scan without blood draws its "positive" centres from the head too: every crop is head-centred.
    negative = D.CropIndicesd()({"image": image, "label": np.zeros_like(label)})
    assert negative["label_fg_indices"] is negative["label_bg_indices"]


def test_crops_are_centred_on_blood_at_the_requested_rate():
    image, label = _head_phantom()
    item = D.CropIndicesd()({"image": image, "label": label})
    for fraction in (0.0, 0.25, 0.75):
        crop = D.RandHemorrhageCropd(16, fraction)
        crop.set_random_state(seed=0)
        centred, inside = [], []
        for _ in range(400):
            out = crop(item)
            assert out["image"].shape == out["label"].shape == (1, 16, 16, 16)
            centred.append(out["label"][0, 8, 8, 8].item() == 1)
            inside.append(out["image"][0, 8, 8, 8].item() > -2.0)
        assert abs(np.mean(centred) - fraction) < 0.07, (fraction, np.mean(centred))
        assert all(inside)  # negative crops are centred in the head, not in the air
    negative = D.RandHemorrhageCropd(16, 1.0)   # ICH-negative scan: head crops even at fraction 1
    negative.set_random_state(seed=0)
    empty = D.CropIndicesd()({"image": image, "label": np.zeros_like(label)})
    for _ in range(50):
        out = negative(empty)
        assert out["label"].sum() == 0 and out["image"][0, 8, 8, 8].item() > -2.0
    assert np.array_equal(item["image"], image)   # crops own their memory; the cached volume is untouched


def _streak_phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A z-scored head (brain 0, unit 1): a bone shell at +3, a streak at +0.5 (in the brain window ~ +35 HU) and
    labelled blood at +0.8. Returns image, label and the streak's mask."""
    image = np.full((1, 64, 64, 64), -3.0, dtype=np.float32)
    image[:, 4:60, 4:60, 4:60] = 3.0                     # skull
    image[:, 8:56, 8:56, 8:56] = 0.0                     # brain
    streak = np.zeros((64, 64, 64), dtype=bool)
    streak[20:23, 9:55, 40:44] = True                   # runs from the inner table across the head
    image[0][streak] = 0.5
    label = np.zeros((1, 64, 64, 64), dtype=np.uint8)
    label[:, 30:36, 20:26, 20:26] = 1
    image[0][label[0] > 0] = 0.8
    return image, label, streak


def _centred_on_streak(crop: D.RandHemorrhageCropd, scan: dict) -> list[bool]:
    """For 300 crops of ``scan`` (a _streak_phantom): whether each is centred on the streak."""
    return [crop(scan)["image"][0, 8, 8, 8].item() == 0.5 for _ in range(300)]


def test_hyperdense_tissue_clear_of_bone_and_blood_is_indexed_as_hard_negatives():
    image, label, streak = _streak_phantom()
    assert "label_hard_bg_indices" not in D.CropIndicesd()({"image": image, "label": label})   # only when asked
    item = D.CropIndicesd(hard_negatives=True)({"image": image, "label": label})
    hard = np.zeros(streak.shape, dtype=bool)
    hard.flat[item["label_hard_bg_indices"]] = True
    assert item["label_hard_bg_indices"].dtype == np.int32 and item["has_hemorrhage"]
    assert not (hard & (label[0] > 0)).any()                          # never the blood itself
    bone = image[0] > 1.5
    near_bone = ndimage.binary_dilation(bone, iterations=data.transforms.BONE_CLEARANCE_VOXELS)
    assert not (hard & near_bone).any()                               # never the rim at the inner table
    assert (hard >= (streak & ~near_bone)).all()                      # the whole streak away from bone
    near_dense = ndimage.binary_dilation(streak | (label[0] > 0))
    assert (hard <= near_dense).all()                                 # and nothing but it (and blood's edge)
    # Plain brain has no hard negatives, and the threshold is in head-tissue units (it scales with the image).
    brain_and_bone = np.where(image > 0.1, np.where(image > 1.5, 3.0, 0.0), image).astype(np.float32)
    plain = D.CropIndicesd(hard_negatives=True)({"image": brain_and_bone, "label": np.zeros_like(label)})
    assert plain["label_hard_bg_indices"].size == 0 and not plain["has_hemorrhage"]
    wide_unit = D.CropIndicesd(intensity_unit=5.0, hard_negatives=True)({"image": image, "label": label})
    assert not set(wide_unit["label_hard_bg_indices"]) & set(np.flatnonzero(streak))   # +0.1 units: not dense


def test_hard_negative_crops_are_centred_on_hyperdense_tissue_at_the_requested_rate():
    image, label, streak = _streak_phantom()
    image[0][label[0] > 0] = 0.0              # blood as dense as brain: the streak is the only hard negative
    item = D.CropIndicesd(hard_negatives=True)({"image": image, "label": label})
    assert set(np.flatnonzero(streak)) >= set(item["label_hard_bg_indices"])

    for fraction in (0.0, 0.5, 1.0):
        crop = D.RandHemorrhageCropd(16, 0.0, hard_negative_fraction=fraction)
        crop.set_random_state(seed=0)
        # Head crops land on the streak by chance ~0.3 % of the time; hard-negative crops always do.
        assert abs(np.mean(_centred_on_streak(crop, item)) - fraction) < 0.08, fraction
    # Blood-centred crops are not replaced.
    crop = D.RandHemorrhageCropd(16, 1.0, hard_negative_fraction=1.0)
    crop.set_random_state(seed=0)
    assert all(crop(item)["label"][0, 8, 8, 8] == 1 for _ in range(50))
    # An ICH-negative scan: every crop is a head crop, so hard negatives replace its "positive" draws too.
    negative = D.CropIndicesd(hard_negatives=True)({"image": image, "label": np.zeros_like(label)})
    assert all(_centred_on_streak(crop, negative))
    # Without hyperdense tissue the crop falls back to the head.
    plain = dict(item, label_hard_bg_indices=np.zeros(0, dtype=np.int32))
    crop = D.RandHemorrhageCropd(16, 0.0, hard_negative_fraction=1.0)
    assert all(crop(plain)["image"][0, 8, 8, 8].item() > -3.0 for _ in range(50))
    unindexed = {key: value for key, value in item.items() if key != "label_hard_bg_indices"}
    assert sum(crop(unindexed)["image"][0, 8, 8, 8].item() == 0.5 for _ in range(50)) < 10   # head crops
    with pytest.raises(ValueError, match="hard_negative_fraction must be in"):
        D.RandHemorrhageCropd(16, 0.5, hard_negative_fraction=1.5)


def test_mined_false_positives_centre_their_share_of_crops_whatever_the_scan_label():
    image, label, streak = _streak_phantom()
    item = D.CropIndicesd()({"image": image, "label": label})
    mined = {**item, data.transforms.MINED_INDICES_KEY: np.flatnonzero(streak).astype(np.int32)}

    for fraction in (0.0, 0.5, 1.0):
        # Blood-centred crops otherwise: mining takes its share of those too (the streak may lie in a positive scan).
        crop = D.RandHemorrhageCropd(16, 1.0, mined_fraction=fraction)
        crop.set_random_state(seed=0)
        assert abs(np.mean(_centred_on_streak(crop, mined)) - fraction) < 0.08, fraction
    # A scan the model reads right (no mined voxels, or none mined yet) is cropped exactly as without mining.
    for scan in (item, {**item, data.transforms.MINED_INDICES_KEY: np.zeros(0, dtype=np.int32)}):
        plain, mining = D.RandHemorrhageCropd(16, 0.75), D.RandHemorrhageCropd(16, 0.75, mined_fraction=0.5)
        plain.set_random_state(seed=3)
        mining.set_random_state(seed=3)
        for _ in range(20):
            assert torch.equal(plain(scan)["image"], mining(scan)["image"])
    with pytest.raises(ValueError, match="mined_fraction must be in"):
        D.RandHemorrhageCropd(16, 0.5, mined_fraction=-0.1)


def test_mined_voxels_reach_every_worker_with_the_epoch_that_uses_them(cohort_dir):
    data_config = config(cohort_dir, false_positive_crop_fraction=1.0, augmentation_prob=0.0)
    cohort = D.validate_cohort(data_config)
    # The first voxel of each scan: a corner in the air, where no other crop is centred.
    corners = {index: np.zeros(1, dtype=np.int32) for index in range(len(cohort.train))}

    def air_share(batches) -> float:
        images = torch.cat([b["image"] for b in batches])
        return float((images == images.amin(dim=(1, 2, 3, 4), keepdim=True)).float().mean())

    # roi 8: the 16-17 voxel scans leave the crop room to move.
    unmined_loader, _ = loaders(data_config, cohort, 8, 2, seed=5)
    D.set_epoch(unmined_loader, 1)
    unmined = list(unmined_loader)
    reference, _ = loaders(data_config, cohort, 8, 2, seed=5)
    D.set_epoch(reference, 1, mined=corners)
    expected = list(reference)
    assert air_share(expected) > 1.5 * air_share(unmined)   # measured 0.24 vs 0.13
    with_workers, _ = loaders(dataclasses.replace(data_config, num_workers=2), cohort, 8, 2, seed=5)
    assert with_workers.persistent_workers
    D.set_epoch(with_workers, 0)
    assert _fingerprint(list(with_workers)) != _fingerprint(expected)   # workers started before any mining
    D.set_epoch(with_workers, 1, mined=corners)
    assert _fingerprint(list(with_workers)) == _fingerprint(expected)
    D.set_epoch(with_workers, 2)   # the mined voxels stay until the next mining pass replaces them
    assert all(len(key) == 3 for key in with_workers.sampler)


@pytest.mark.parametrize("axis", [0, 2])
def test_in_plane_rotation_turns_about_the_slice_axis_only(axis):
    # Every slice holds its own constant value plus a bar of blood off-centre: a rotation about the slice axis moves
    # the bar within its slices and leaves each slice's value where it was.
    image = np.zeros((1, 24, 24, 24), dtype=np.float32)
    view = [1, 1, 1, 1]
    view[1 + axis] = 24
    image += np.arange(24, dtype=np.float32).reshape(view)
    label = np.zeros((1, 24, 24, 24), dtype=np.uint8)
    bar = [slice(None), slice(10, 14), slice(10, 14), slice(10, 14)]
    bar[1 + (axis + 1) % 3] = slice(18, 22)                       # off the rotation axis, so it moves
    label[tuple(bar)] = 1
    rotate = data.transforms.RandSliceRotated(prob=1.0, max_degrees=180)
    rotate.set_random_state(seed=3)
    moved = 0
    for _ in range(10):
        out = rotate({"image": torch.from_numpy(image), "label": torch.from_numpy(label), "slice_axis": axis})
        rotated, rotated_label = np.asarray(out["image"])[0], np.asarray(out["label"])[0]
        np.testing.assert_allclose(rotated, image[0], atol=1e-4)              # slices keep their values
        assert set(np.unique(rotated_label)) <= {0, 1}
        assert rotated_label.sum(axis=tuple(a for a in range(3) if a != axis)).nonzero()[0].tolist() == \
            label[0].sum(axis=tuple(a for a in range(3) if a != axis)).nonzero()[0].tolist()   # same slices
        moved += int(not np.array_equal(rotated_label, label[0]))
    assert moved >= 8
    off = data.transforms.RandSliceRotated(prob=1.0, max_degrees=0)
    assert off({"image": image, "label": label, "slice_axis": axis})["image"] is image
    never = data.transforms.RandSliceRotated(prob=0.0, max_degrees=180)
    assert never({"image": image, "label": label, "slice_axis": axis})["label"] is label


def test_the_slice_axis_is_the_one_with_the_largest_spacing():
    from data.io import slice_axis
    assert slice_axis((0.45, 0.45, 5.0)) == 2 and slice_axis((5.0, 0.5, 0.5)) == 0
    assert slice_axis((1.0, 1.0, 1.0)) == 2 and slice_axis((2.0, 2.0, 1.0)) == 1      # ties: the last of them


def test_training_crops_show_blood_anywhere_in_the_central_half_of_the_window(tmp_path):
    """The ViT learns absolute positions: crops always centred on blood taught it 'blood sits mid-window', which
    sliding-window inference never promises. The chosen voxel must land within ±roi/4 of the centre, spread out."""
    image, label = _head_phantom()
    label[:] = 0
    label[:, 32, 32, 32] = 1                                  # one blood voxel: its place in the crop is the offset
    preprocessing = data.transforms.Preprocessing((-100.0, 200.0), "zscore", (2.0, 2.0, 2.0), 16)
    transforms = data.transforms.build_transforms(preprocessing, tmp_path, positive_crop_fraction=1.0,
                                                  augmentation_prob=0.0)
    transforms.train_random.set_random_state(seed=0)
    item = D.CropIndicesd()({"image": image, "label": label})
    offsets = []
    for _ in range(300):
        out = transforms.train_random(item)
        assert out["image"].shape == (1, 16, 16, 16)
        (where,) = np.argwhere(np.asarray(out["label"][0]) > 0)
        offsets.append(where - 8)
    offsets = np.array(offsets)
    jitter = int(16 * data.transforms.CENTRE_JITTER_FRACTION)
    assert np.abs(offsets).max() <= jitter
    for axis in range(3):   # every offset in the range occurs, on each axis (uniform: ~33 draws per value)
        assert set(offsets[:, axis]) == set(range(-jitter, jitter + 1)), (axis, sorted(set(offsets[:, axis])))


def test_crop_centres_stay_inside_the_volume_and_short_axes_are_padded_with_air():
    image, label = _head_phantom()
    image, label = image[:, :, :, :10].copy(), label[:, :, :, :10].copy()   # axis 2 shorter than the crop
    label[:, 30:34, 30:34, :] = 0
    label[:, 0, 0, 0] = 1                                                    # blood in a corner
    item = D.CropIndicesd()({"image": image, "label": label})
    crop, pad = D.RandHemorrhageCropd(16, 1.0), D.PadToRoid(16)
    crop.set_random_state(seed=1)
    out = pad(crop(item))
    assert out["image"].shape == (1, 16, 16, 16)
    assert out["label"][0, 0, 0, 3] == 1            # the corner: the crop was moved inwards, axis 2 padded 3 + 3
    assert (out["image"][..., :3] == -2.0).all() and (out["image"][..., 13:] == -2.0).all()


def test_small_volumes_are_padded_with_air(cohort_dir):
    data_config = config(cohort_dir, augmentation_prob=0.0)
    cohort = D.validate_cohort(data_config)
    (epoch,), _ = _run_epochs(data_config, cohort, epochs=1, roi=24, batch=4)
    image = epoch[0]["image"]
    assert image.shape == (4, 1, 24, 24, 24)
    # 24×24×10 at 2×2×5 mm -> 16×16×17 at 3 mm; padded to 24³ with the volume minimum (air), not 0.
    assert torch.isclose(image[:, :, :, :, 0], image.amin(dim=(1, 2, 3, 4))[:, None, None, None]).all()


def _fingerprint(batches):
    return [(b["case_id"], b["image"].sum().item(), b["label"].sum().item()) for b in batches]


def test_training_randomness_depends_only_on_seed_and_epoch(cohort_dir):
    data_config = config(cohort_dir, augmentation_prob=1.0)
    cohort = D.validate_cohort(data_config)
    (first_0, first_1), _ = _run_epochs(data_config, cohort, seed=5)
    (again_0, again_1), _ = _run_epochs(config(cohort_dir, augmentation_prob=1.0, cache_in_memory=True), cohort,
                                        seed=5)
    assert _fingerprint(first_0) == _fingerprint(again_0) and _fingerprint(first_1) == _fingerprint(again_1)
    assert _fingerprint(first_0) != _fingerprint(first_1)
    torch.testing.assert_close(first_1[0]["image"], again_1[0]["image"])
    # Every spatial augmentation moved image and label together: labelled voxels are the bright (blood) ones.
    checked = 0
    for batch in first_0 + first_1:
        for image, label in zip(batch["image"][:, 0], batch["label"][:, 0]):
            if label.sum() > 20:
                tissue = (label == 0) & (image > image.min() + 0.5)
                assert image[label == 1].median() > image[tissue].median() + 0.5
                checked += 1
    assert checked >= 3

    # A resumed run that starts at epoch 1 in a fresh process sees exactly the uninterrupted epoch 1 ...
    train, _ = loaders(data_config, cohort, 16, 2, seed=5)
    D.set_epoch(train, 1)
    assert _fingerprint(list(train)) == _fingerprint(first_1)
    # ... also with worker processes, and a different seed gives different crops.
    with_workers = config(cohort_dir, augmentation_prob=1.0, num_workers=2)
    train, val = loaders(with_workers, cohort, 16, 2, seed=5)
    assert train.num_workers == 2 and train.persistent_workers and not train.pin_memory
    for epoch, expected in ((0, first_0), (1, first_1)):
        D.set_epoch(train, epoch)
        assert _fingerprint(list(train)) == _fingerprint(expected)
    (other_0, _), _ = _run_epochs(data_config, cohort, seed=6)
    assert _fingerprint(other_0) != _fingerprint(first_0)


def test_device_side_augmentation_gives_the_same_batches(cohort_dir):
    # The GPU path (ThreadDataLoader, crops moved to the device before augmenting) exercised on the CPU device:
    # same crops, same augmentation draws, same batches as the worker-process path.
    data_config = config(cohort_dir, augmentation_prob=1.0)
    cohort = D.validate_cohort(data_config)
    on_host, _ = loaders(data_config, cohort, 16, 2, seed=5)
    on_device, _ = loaders(data_config, cohort, 16, 2, seed=5, augment_on_device=True)
    assert isinstance(on_device, D.ThreadDataLoader) and on_device.num_workers == 0
    assert not isinstance(on_host, D.ThreadDataLoader)
    for epoch in (0, 1):
        D.set_epoch(on_host, epoch)
        D.set_epoch(on_device, epoch)
        host_batches, device_batches = list(on_host), list(on_device)
        assert _fingerprint(host_batches) == _fingerprint(device_batches)
        for a, b in zip(host_batches, device_batches):
            torch.testing.assert_close(a["image"], b["image"])
            assert torch.equal(a["label"], b["label"])


def test_forgetting_set_epoch_is_warned(cohort_dir, caplog):
    data_config = config(cohort_dir)
    train, _ = loaders(data_config, D.validate_cohort(data_config), 16, 2, seed=0)
    list(train)
    list(train)
    assert "iterated twice for epoch 0" in caplog.text


def test_distributed_shards(cohort_dir):
    data_config = config(cohort_dir)
    cohort = D.validate_cohort(data_config)
    seen_train, seen_val = [], []
    for rank in (0, 1):
        train, val = loaders(data_config, cohort, 16, 1, seed=0, rank=rank, world_size=2)
        D.set_epoch(train, 3)
        seen_train.append(sorted(b["case_id"][0] for b in train))
        seen_val.append([b["case_id"][0] for b in val])
    assert len(seen_train[0]) == len(seen_train[1]) == 2
    assert sorted(seen_train[0] + seen_train[1]) == ["001", "002", "003", "004"]
    assert sorted(seen_val[0] + seen_val[1]) == ["005", "006"]
    with pytest.raises(ValueError, match="rank"):
        loaders(data_config, cohort, 16, 1, seed=0, rank=2, world_size=2)


def test_worker_count_is_automatic_or_explicit(monkeypatch):
    class Memory:
        available = 16 * 2**30

    monkeypatch.setattr(data.loaders, "usable_cpu_count", lambda: 6)
    monkeypatch.setattr(data.loaders.psutil, "virtual_memory", lambda: Memory())
    cpu = torch.device("cpu")
    # One core stays with the training process: 5 workers; at most 8 however many cores there are.
    assert D.choose_num_workers(DataConfig(), cpu, largest_volume_bytes=10 * 2**20) == 5
    monkeypatch.setattr(data.loaders, "usable_cpu_count", lambda: 64)
    assert D.choose_num_workers(DataConfig(), cpu, largest_volume_bytes=10 * 2**20) == 8
    # Memory bounds it too: half of 16 GiB over (0.5 GiB + 4 volumes of 1 GiB) per worker = 1 worker.
    assert D.choose_num_workers(DataConfig(), cpu, largest_volume_bytes=2**30) == 1
    Memory.available = 2**30
    assert D.choose_num_workers(DataConfig(), cpu, largest_volume_bytes=2**30) == 0
    assert D.choose_num_workers(DataConfig(num_workers=3), cpu) == 3


# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------

def test_dataset_statistics(cohort_dir):
    data_config = config(cohort_dir)
    cohort = D.validate_cohort(data_config)
    stats = json.loads(json.dumps(D.compute_dataset_stats(cohort, data_config)))   # JSON-ready
    assert stats["n_scans"] == 6
    assert stats["splits"]["train"] == {"scans": 4, "positive": 2, "negative": 2, "patients": 3}
    assert stats["splits"]["val"] == {"scans": 2, "positive": 1, "negative": 1, "patients": 2}
    blood_voxels = int(phantom()[1].sum())
    voxel_ml = np.prod(SPACING) / 1000
    assert stats["hemorrhage_ml"]["scans"] == 3
    assert stats["hemorrhage_ml"]["sum"] == pytest.approx(3 * blood_voxels * voxel_ml)
    assert stats["hemorrhage_ml"]["median"] == pytest.approx(blood_voxels * voxel_ml)
    assert stats["foreground_fraction"]["overall"] == pytest.approx(3 * blood_voxels / (6 * np.prod(SHAPE)))
    assert stats["shape"]["median"] == list(SHAPE) and stats["spacing_sources"] == {"image": 6}
    assert stats["hu_percentiles"]["p1"] == -1000 and 20 <= stats["hu_percentiles"]["p75"] <= 45
    assert stats["hu_percentiles"]["p99.5"] == 70
    # Same numbers when nothing was gathered during validation (cases are read again).
    bare = D.Cohort(train=cohort.train, val=cohort.val, warnings=[])
    assert D.compute_dataset_stats(bare, data_config)["hemorrhage_ml"] == stats["hemorrhage_ml"]
    table = D.format_stats_table(stats)
    assert "train         4      2      2         3" in table
    assert "hemorrhage mL (3 scans with blood)" in table and "HU percentiles" in table


def test_a_subdural_crescent_against_the_skull_is_blood_despite_its_partial_volume_rim():
    volume = np.full((40, 40, 10), 30.0, dtype=np.float32)   # brain
    volume[:, :4] = 1200.0                                   # skull
    mask = np.zeros(volume.shape, dtype=np.uint8)
    mask[5:35, 4:8, 2:8] = 1                                 # a 4-voxel-thick crescent right against it
    volume[mask > 0] = 70.0
    volume[5:35, 4, 2:8] = 550.0                             # partial volume of the skull on its edge: 25 %
    assert data.geometry.label_findings(volume, mask) is None
    shifted = np.roll(mask, -4, axis=1)                      # the same mask moved into the skull
    assert "bone" in data.geometry.label_findings(volume, shifted)


def test_scale_augmentation_widens_the_range_of_bleed_sizes_in_crops(tmp_path):
    """--scale_augmentation s scales each axis by 1 ± s: a 64-voxel bleed comes out far smaller and far larger
    than the ±10 % default lets it (a thinner crescent than any in training is then no longer new)."""
    image, label = _head_phantom()
    preprocessing = data.transforms.Preprocessing((-100.0, 200.0), "zscore", (2.0, 2.0, 2.0), 16)
    item = D.CropIndicesd()({"image": image, "label": label})
    sizes = {}
    for scale in (0.1, 0.5):
        transforms = data.transforms.build_transforms(preprocessing, tmp_path, positive_crop_fraction=1.0,
                                                      augmentation_prob=1.0, scale_augmentation=scale)
        transforms.train_random.set_random_state(seed=0)
        sizes[scale] = [int(transforms.train_random(item)["label"].sum()) for _ in range(60)]
    assert 40 < min(sizes[0.1]) and max(sizes[0.1]) < 95
    assert min(sizes[0.5]) < 30 and max(sizes[0.5]) > 150
