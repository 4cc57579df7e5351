"""The synthetic head-CT cohort generator (synthetic.py): user format, realism, determinism, CLI."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import Delaunay

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
    assert kinds == set(S.Appearance().lesion_kinds)
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


# --- Appearance: lesion kinds, foci, blood density, noise, streaks ---------------------------------------------

def _digest(*arrays: np.ndarray) -> str:
    """HU rounded to integers, so the digest does not hinge on the last float bit of a BLAS or libm."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.rint(array).astype(np.int16).tobytes())
    return digest.hexdigest()[:16]


def _cohort_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for row in read_rows(root / f"{split}.csv"):
            name = Path(row["path"]).name
            digest.update(f"{name},{row['ich']},{row['patient_id']}".encode())
            payload = pickle.loads((root / "images" / name).read_bytes())   # our own files: safe to unpickle
            volume = payload if isinstance(payload, np.ndarray) else next(
                v for v in payload.values() if isinstance(v, np.ndarray) and v.ndim == 3)
            digest.update(str(volume.dtype).encode())
            digest.update(np.rint(volume).astype(np.int16).tobytes())
    for path in sorted((root / "masks").iterdir()):
        digest.update(path.name.encode())
        digest.update(np.asarray(nib.load(path).dataobj).tobytes())
    return digest.hexdigest()[:16]


def test_default_appearance_reproduces_earlier_cohorts_exactly(tmp_path):
    # Digests computed with synthetic.py as of 88f4add, before Appearance existed: the self-test, the benchmarks
    # and every cohort made so far depend on the defaults drawing the same random numbers in the same order.
    expected = {(0, True): ("subdural",), (3, True): ("ellipsoid", "lobulated"), (6, True): ("ellipsoid", "subdural"),
                (0, False): ()}
    digests = {(0, True): "8f643a4884bece50", (3, True): "6fa7489e9767defb", (6, True): "b5bf8e0306038f8d",
               (0, False): "d6199580c584a27e"}
    for (seed, positive), kinds in expected.items():
        for appearance in (None, S.Appearance()):
            scan = S.synthesize_scan((64, 64, 16), (1.8, 1.8, 5.0), np.random.default_rng(seed), positive,
                                     appearance=appearance)
            assert scan.lesion_kinds == kinds and scan.streaks == 0
            digest = hashlib.sha256(scan.mask.tobytes() + np.rint(scan.image).astype(np.int16).tobytes())
            assert digest.hexdigest()[:16] == digests[seed, positive]
    cohort = S.generate_cohort(tmp_path / "c", 4, 2, shape=(48, 48, 12), spacing=(2.0, 2.0, 5.0), seed=5)
    assert _cohort_digest(cohort.root) == "112fb2b24743d92e"


def _only(kind: str, **changes) -> S.Appearance:
    return S.Appearance(lesion_kinds=(kind,), kind_weights=(1.0,), multifocal_fraction=0.0, noise_hu=(0.0, 0.0),
                        **changes)


def _intracranial(image: np.ndarray, slice_axis: int = 2) -> np.ndarray:
    """Inside the skull ring, slice by slice (bone > 300 HU in a noise-free image)."""
    bone = image > 300
    inside = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(bone, slice_axis, 0)])
    return np.moveaxis(inside, 0, slice_axis) & ~bone


def _solidity(mask: np.ndarray, spacing) -> float:
    """Lesion voxels / voxels whose centres lie in the lesion's convex hull: 1 for convex shapes."""
    points = np.argwhere(mask) * np.asarray(spacing)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(np.argwhere(mask).min(0), np.argwhere(mask).max(0)))
    grid = (np.argwhere(np.ones(mask[box].shape, dtype=bool)) + [b.start for b in box]) * np.asarray(spacing)
    return float(mask.sum() / np.count_nonzero(Delaunay(points).find_simplex(grid) >= 0))


@pytest.mark.parametrize("kind", S.LESION_KINDS)
def test_each_kind_is_one_lesion_of_the_requested_volume(kind):
    for seed in range(3):
        scan = S.synthesize_scan((96, 96, 24), (1.5, 1.5, 5.0), np.random.default_rng(seed), True, min_ml=4,
                                 max_ml=12, appearance=_only(kind))
        assert scan.lesion_kinds == (kind,)
        assert 0.9 * 4 <= scan.blood_ml <= 1.1 * 12
        assert scan.foci == 1 and ndimage.label(scan.mask)[1] == 1 and scan.focus_ml == (scan.blood_ml,)
        assert not (scan.mask.astype(bool) & ~_intracranial(scan.image)).any()   # never in bone or scalp


def test_subdural_blood_lies_under_the_skull():
    spacing = (1.5, 1.5, 5.0)
    for seed in range(3):
        scan = S.synthesize_scan((96, 96, 24), spacing, np.random.default_rng(seed), True, min_ml=4, max_ml=12,
                                 appearance=_only("subdural"))
        mm_to_bone = ndimage.distance_transform_edt(scan.image < 300, sampling=spacing)[scan.mask.astype(bool)]
        assert mm_to_bone.min() <= 2.0 and mm_to_bone.max() <= 13.0   # a crescent 6-12 mm thick on the inner table


def test_intraventricular_blood_layers_in_the_dependent_part_of_a_ventricle():
    shape, spacing = (128, 128, 32), (1.4, 1.4, 4.0)
    for seed in range(3):
        head = S.random_head(shape, spacing, np.random.default_rng(100 + seed))
        plain = S.synthesize_scan(shape, spacing, np.random.default_rng(seed), False, head=head,
                                  appearance=_only("ellipsoid"))
        csf = _intracranial(plain.image) & (plain.image < 16)
        labels, n = ndimage.label(csf)
        assert n == 2                                                  # the two lateral ventricles
        small = S.synthesize_scan(shape, spacing, np.random.default_rng(seed), True, head=head, min_ml=2,
                                  max_ml=3, appearance=_only("intraventricular"))
        blood = small.mask.astype(bool)
        ventricle = labels == np.bincount(labels[blood], minlength=3)[1:].argmax() + 1
        assert np.count_nonzero(blood & ventricle) >= 0.6 * blood.sum()            # mostly inside the ventricle
        assert ndimage.distance_transform_edt(~ventricle, sampling=spacing)[blood].max() <= 4.0   # a thin rim
        assert (ventricle & ~blood & (small.image < 16)).any()        # the rest of the ventricle is still CSF
        # Blood settles posteriorly (low index along the front-back axis) for a supine patient.
        assert np.argwhere(blood)[:, 1].mean() < np.argwhere(ventricle)[:, 1].mean() - 2
        large = S.synthesize_scan(shape, spacing, np.random.default_rng(seed), True, head=head, min_ml=12,
                                  max_ml=15, appearance=_only("intraventricular"))
        cast = large.mask.astype(bool)
        assert large.lesion_kinds == ("intraventricular",) and 0.9 * 12 <= large.blood_ml <= 1.1 * 15
        assert np.count_nonzero(cast & ventricle) >= 0.9 * ventricle.sum()        # fills it and spreads around
        assert ndimage.distance_transform_edt(~ventricle, sampling=spacing)[cast].max() <= 25.0


def test_irregular_bleeds_are_far_less_convex_than_ellipsoids():
    spacing = (1.5, 1.5, 2.5)
    solidity = {}
    for kind in ("irregular", "ellipsoid"):
        solidity[kind] = [_solidity(S.synthesize_scan((96, 96, 48), spacing, np.random.default_rng(seed), True,
                                                      min_ml=4, max_ml=20, appearance=_only(kind)).mask, spacing)
                          for seed in range(4)]
    assert min(solidity["ellipsoid"]) > 0.95
    assert np.mean(solidity["irregular"]) < 0.8 and max(solidity["irregular"]) < 0.92


def test_multifocal_scans_have_the_requested_number_of_separate_foci():
    appearance = S.Appearance(lesion_kinds=S.LESION_KINDS, kind_weights=(1.0,) * 5, max_foci=3,
                              multifocal_fraction=1.0, separate_foci=True)
    counts = set()
    for seed in range(8):
        scan = S.synthesize_scan((96, 96, 24), (1.5, 1.5, 5.0), np.random.default_rng(seed), True, min_ml=3,
                                 max_ml=30, appearance=appearance)
        n = len(scan.lesion_kinds)
        counts.add(n)
        assert 2 <= n <= 3 and scan.foci == n
        assert ndimage.label(scan.mask)[1] == n                         # 6- and 26-connected counts agree
        assert ndimage.label(scan.mask, structure=np.ones((3, 3, 3)))[1] == n
        assert len(scan.focus_ml) == n and sum(scan.focus_ml) == pytest.approx(scan.blood_ml)
        assert 0.9 * 3 <= scan.blood_ml <= 1.1 * 30                     # the total, not each focus
    assert counts == {2, 3}
    for changes in ({"multifocal_fraction": 0.0, "max_foci": 4}, {"multifocal_fraction": 1.0, "max_foci": 1}):
        single = S.Appearance(**changes)
        assert all(len(S.synthesize_scan((64, 64, 16), (1.8, 1.8, 5.0), np.random.default_rng(seed), True,
                                         appearance=single).lesion_kinds) == 1 for seed in range(4))


def test_blood_density_and_noise_ranges_show_in_the_image():
    shape, spacing = (96, 96, 24), (1.5, 1.5, 5.0)

    def scan(**changes):
        return S.synthesize_scan(shape, spacing, np.random.default_rng(4), True,
                                 appearance=dataclasses.replace(_only("ellipsoid"), **changes))

    dim, bright = scan(blood_hu=(50.0, 55.0)), scan(blood_hu=(95.0, 100.0))
    np.testing.assert_array_equal(dim.mask, bright.mask)    # same draws: only the density changes
    core = ndimage.binary_erosion(dim.mask.astype(bool))
    assert 50 - 2 <= np.median(dim.image[core]) <= 55 + 2 and 95 - 2 <= np.median(bright.image[core]) <= 100 + 2
    # With the same seed the noise-free scan is the noisy scan minus its noise (padding outside the FOV has none).
    quiet = scan()
    for low, high in ((10.0, 10.0), (2.0, 3.0)):
        noisy = scan(noise_hu=(low, high))
        noise = (noisy.image - quiet.image)[quiet.image > -1500]
        assert low * 0.97 <= noise.std() <= high * 1.03 and abs(noise.mean()) < 0.1


@pytest.mark.parametrize("shape, spacing, slice_axis", [((96, 96, 24), (1.5, 1.5, 5.0), 2),
                                                        ((20, 80, 80), (5.0, 1.8, 1.8), 0)])
def test_streaks_change_the_head_but_not_the_blood_or_the_air(shape, spacing, slice_axis):
    changed_any = False
    for seed in range(3):
        plain, streaked = (S.synthesize_scan(shape, spacing, np.random.default_rng(seed), True,
                                             appearance=S.Appearance(streak_fraction=fraction))
                           for fraction in (0.0, 1.0))
        np.testing.assert_array_equal(plain.mask, streaked.mask)
        assert plain.streaks == 0 and 2 <= streaked.streaks <= 5
        change = streaked.image - plain.image
        assert not change[plain.mask.astype(bool)].any()             # the blood keeps its HU: the mask stays true
        assert not change[plain.image < -500].any()                   # air and outside-FOV padding untouched
        assert 7.5 <= np.abs(change).max() <= 5 * 60
        # Streaks lie in the axial plane of the lower slices (along the axis with the largest spacing).
        slices = np.flatnonzero(np.abs(change).max(axis=tuple(a for a in range(3) if a != slice_axis)) > 0)
        assert slices.max() < shape[slice_axis] // 2 + shape[slice_axis] // 3
        changed_any |= np.count_nonzero(np.abs(change) > 10) > 50
    assert changed_any


@pytest.mark.parametrize("changes, field_name", [
    ({"noise_hu": (-1.0, 4.0)}, "noise_hu"),
    ({"noise_hu": (6.0, 4.0)}, "noise_hu"),
    ({"blood_hu": (80.0, 60.0)}, "blood_hu"),
    ({"lesion_kinds": ("ellipsoid", "blob"), "kind_weights": (1.0, 1.0)}, "lesion_kinds"),
    ({"lesion_kinds": ("ellipsoid", "irregular")}, "kind_weights"),       # three default weights for two kinds
    ({"kind_weights": (1.0, -1.0, 1.0)}, "kind_weights"),
    ({"max_foci": 0}, "max_foci"),
    ({"multifocal_fraction": 1.5}, "multifocal_fraction"),
    ({"streak_fraction": -0.1}, "streak_fraction"),
])
def test_bad_appearance_values_raise_naming_the_field(changes, field_name):
    with pytest.raises(ValueError, match=field_name):
        S.Appearance(**changes)


def test_all_bad_appearance_values_are_reported_at_once():
    with pytest.raises(ValueError) as info:
        S.Appearance(max_foci=0, noise_hu=(-1.0, 2.0), streak_fraction=2.0)
    assert all(name in str(info.value) for name in ("max_foci", "noise_hu", "streak_fraction"))


def test_cli_flags_reach_the_appearance(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(S, "generate_cohort", lambda *args, **kwargs: calls.append(kwargs) or S.SyntheticCohort(
        tmp_path / "t.csv", tmp_path / "v.csv", tmp_path / "masks", tmp_path))
    base = ["--out_dir", str(tmp_path)]
    assert S.main(base) == 0
    assert calls[-1]["appearance"] == S.Appearance()
    assert S.main(base + ["--lesion_kinds", "intraventricular", "irregular", "--max_foci", "3",
                          "--multifocal_fraction", "0.4", "--separate_foci", "--blood_hu", "50", "65",
                          "--noise_hu", "6", "12", "--streak_fraction", "0.3"]) == 0
    assert calls[-1]["appearance"] == S.Appearance(
        lesion_kinds=("intraventricular", "irregular"), kind_weights=(1.0, 1.0), max_foci=3, multifocal_fraction=0.4,
        separate_foci=True, blood_hu=(50.0, 65.0), noise_hu=(6.0, 12.0), streak_fraction=0.3)
    assert S.main(base + ["--lesion_kinds", "subdural", "irregular", "--kind_weights", "1", "3"]) == 0
    assert calls[-1]["appearance"].kind_probabilities == (0.25, 0.75)
    for bad, field_name in ((["--noise_hu", "-2", "4"], "noise_hu"), (["--kind_weights", "1", "2"], "kind_weights"),
                            (["--max_foci", "0"], "max_foci"), (["--streak_fraction", "1.2"], "streak_fraction")):
        with pytest.raises(SystemExit) as info:
            S.main(base + bad)
        assert info.value.code == 2 and field_name in capsys.readouterr().err
    with pytest.raises(SystemExit):
        S.main(base + ["--lesion_kinds", "blob"])                   # argparse's own choices check
    assert "invalid choice: 'blob'" in capsys.readouterr().err
