"""The synthetic head-CT cohort generator (synthetic.py): user format, realism, determinism, CLI."""
from __future__ import annotations

import csv
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import dataloader as D
import synthetic as S
from config import DataConfig

SHAPE = (64, 64, 16)
SPACING = (1.8, 1.8, 5.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> S.SyntheticCohort:
    return S.generate_cohort(tmp_path_factory.mktemp("cohort"), n_train=7, n_val=3, shape=SHAPE, spacing=SPACING,
                             seed=3)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cohort_is_in_the_user_format(cohort):
    train, val = read_rows(cohort.train_csv), read_rows(cohort.val_csv)
    assert cohort.train_csv.read_text().splitlines()[0] == "path,ich,patient_id"
    assert [Path(r["path"]).name for r in train + val] == [f"{i:03d}.pkl" for i in range(1, 11)]
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in train + val)
    masks = {p.name for p in cohort.mask_dir.iterdir()}
    for row in train + val:
        number = int(Path(row["path"]).stem)
        has_mask = bool(masks & {f"{number:03d}.nii.gz", f"{number:03d}.nii", f"{number}.nii.gz", f"{number}.nii"})
        assert has_mask == (row["ich"] == "1")        # ICH-negative scans have no mask file
    assert {r["ich"] for r in train} == {"0", "1"} and {r["ich"] for r in val} == {"0", "1"}
    train_patients = [r["patient_id"] for r in train]
    assert not set(train_patients) & {r["patient_id"] for r in val}
    assert max(train_patients.count(p) for p in train_patients) == 2   # some patient has two scans


def test_cohort_passes_validation_using_pkl_and_mask_header_spacing(cohort, tmp_path):
    data_config = DataConfig(train_csv=str(cohort.train_csv), val_csv=str(cohort.val_csv),
                             mask_dir=str(cohort.mask_dir), cache_dir=str(tmp_path / "cache"))
    validated = D.validate_cohort(data_config)
    assert validated.warnings == []                     # no fallback spacing, no label/mask disagreement
    cases = validated.train + validated.val
    assert len(cases) == 10
    assert {c.spacing_source for c in cases} == {"image", "mask_header"}
    assert all(c.spacing == pytest.approx(SPACING) for c in cases)
    # Payload layouts and dtypes vary, as in users' data.
    payloads = [pickle.loads(Path(c.image_path).read_bytes()) for c in cases]  # our own files: safe to unpickle
    kinds = {type(p).__name__ if not isinstance(p, dict) else "+".join(sorted(p)) for p in payloads}
    assert len(kinds) >= 3
    dtypes = {(p if isinstance(p, np.ndarray) else next(v for v in p.values() if isinstance(v, np.ndarray))).dtype
              for p in payloads}
    assert dtypes == {np.dtype(np.int16), np.dtype(np.float32)}


def test_mask_files_are_binary_uint8_with_the_spacing_in_the_affine(cohort):
    for path in sorted(cohort.mask_dir.iterdir()):
        image = nib.load(path)
        assert image.get_data_dtype() == np.uint8 and image.shape == SHAPE
        np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), SPACING)
        assert set(np.unique(np.asarray(image.dataobj))) == {0, 1}


def test_scan_intensities_look_like_head_ct():
    scan = S.synthesize_scan((96, 96, 20), (1.2, 1.2, 4.0), np.random.default_rng(1), with_hemorrhage=True)
    image, mask = scan.image, scan.mask.astype(bool)
    assert image.dtype == np.float32 and scan.mask.dtype == np.uint8
    corners = image[:6, :6, :]
    assert np.median(corners) < -990                                   # air (or the -2048 outside the FOV)
    assert image.max() > 1000 and np.percentile(image, 99) > 700        # skull ring
    core = ndimage.binary_erosion(mask, iterations=1)
    assert core.any() and 60 <= np.median(image[core]) <= 85           # hyperdense blood
    head = (image > -200) & (image < 100) & ~mask
    assert 15 <= np.median(image[head]) <= 40                          # brain ~30 HU
    assert scan.blood_ml == pytest.approx(mask.sum() * 1.2 * 1.2 * 4.0 / 1000)


def test_hemorrhages_are_large_enough_to_learn_at_the_test_resolution():
    kinds = set()
    for seed in range(8):
        scan = S.synthesize_scan((96, 96, 20), (1.2, 1.2, 4.0), np.random.default_rng(seed), with_hemorrhage=True)
        kinds.update(scan.lesion_kinds)
        assert scan.blood_ml >= 4.5
        coarse = D.resample_to_shape(scan.mask, D.preprocessed_shape(scan.mask.shape, (1.2, 1.2, 4.0),
                                                                       (3.0, 3.0, 3.0)), "nearest")
        assert coarse.sum() >= 150                                     # voxels at 3 mm, as the tiny model sees it
    assert kinds == set(S.LESION_KINDS)
    negative = S.synthesize_scan((96, 96, 20), (1.2, 1.2, 4.0), np.random.default_rng(0), with_hemorrhage=False)
    assert negative.mask.sum() == 0 and negative.lesion_kinds == ()


def test_realistic_size_scan():
    scan = S.synthesize_scan((512, 512, 30), (0.45, 0.45, 5.0), np.random.default_rng(0), with_hemorrhage=True)
    assert scan.image.shape == (512, 512, 30) and scan.mask.shape == (512, 512, 30)
    assert 5.0 <= scan.blood_ml <= 45.0


def test_generation_is_deterministic_by_seed(tmp_path):
    def files(seed: int, name: str) -> dict[str, bytes]:
        result = S.generate_cohort(tmp_path / name, 3, 2, shape=(48, 48, 12), spacing=(2.0, 2.0, 5.0), seed=seed)
        return {str(p.relative_to(result.root)): p.read_bytes() for p in sorted(result.root.rglob("*"))
                if p.is_file() and p.suffix != ".csv"}

    first, again, other = files(7, "a"), files(7, "b"), files(8, "c")
    assert first == again
    assert first.keys() != other.keys() or any(first[k] != other[k] for k in first)


def test_relative_paths_and_too_small_grids(tmp_path):
    result = S.generate_cohort(tmp_path / "rel", 2, 1, shape=(48, 48, 12), spacing=(2.0, 2.0, 5.0),
                               relative_paths=True)
    assert read_rows(result.train_csv)[0]["path"] == "images/001.pkl"
    with pytest.raises(ValueError, match="too small for a 5 mL hemorrhage"):
        S.synthesize_scan((16, 16, 8), (1.0, 1.0, 1.0), np.random.default_rng(0), with_hemorrhage=True)


def test_cli(tmp_path, capsys):
    assert S.main(["--out_dir", str(tmp_path / "cli"), "--n_train", "2", "--n_val", "1", "--shape", "48", "48",
                   "12", "--spacing", "2", "2", "5", "--seed", "1"]) == 0
    assert "train CSV" in capsys.readouterr().out
    assert len(read_rows(tmp_path / "cli" / "train.csv")) == 2
    with pytest.raises(SystemExit) as info:
        S.main(["--help"])
    assert info.value.code == 0
