"""splits.py: patient-disjoint, stratified, deterministic folds and test set; small cohorts refused clearly."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import splits
from data.cohort import ScanRow


def make_rows(n_patients=40, seed=0):
    """A cohort without files: some patients with two scans, ~60% ICH-positive, volumes spread over 1-80 mL."""
    rng = np.random.default_rng(seed)
    rows, volumes = [], {}
    for p in range(n_patients):
        positive = rng.random() < 0.6
        for s in range(1 + (rng.random() < 0.3)):
            path = Path(f"/data/{p:03d}_{s}.pkl")
            rows.append(ScanRow("cohort", "/data/cohort.csv", len(rows) + 1, path, int(positive), f"P{p:03d}"))
            volumes[path] = float(rng.uniform(1, 80)) if positive else 0.0
    return rows, volumes


def read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_parts_are_patient_disjoint_and_cover_every_patient():
    rows, volumes = make_rows()
    result = splits.make_splits(rows, folds=5, test_fraction=0.2, seed=0, volumes=volumes)
    parts = [set(result.test), *(set(f) for f in result.folds)]
    everyone = {r.patient_id for r in rows}
    assert set().union(*parts) == everyone
    assert sum(len(p) for p in parts) == len(everyone)  # no patient in two parts
    assert len(result.test) == round(0.2 * len(everyone))


def test_parts_are_stratified_by_ich_and_volume_tertile():
    rows, volumes = make_rows(n_patients=60, seed=1)
    result = splits.make_splits(rows, folds=5, test_fraction=0.2, seed=3, volumes=volumes)
    assert set(result.strata.values()) == {splits.NEGATIVE, *splits.TERTILES}
    for stratum in set(result.strata.values()):
        per_fold = [sum(result.strata[p] == stratum for p in fold) for fold in result.folds]
        assert max(per_fold) - min(per_fold) <= 1, (stratum, per_fold)
        total = sum(s == stratum for s in result.strata.values())
        in_test = sum(result.strata[p] == stratum for p in result.test)
        assert abs(in_test - 0.2 * total) <= 1, (stratum, in_test, total)
    # Tertiles are of the largest hematoma per positive patient: about a third of positive patients each.
    sizes = Counter(s for s in result.strata.values() if s != splits.NEGATIVE)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    low, high = result.tertile_edges_ml
    assert 1 <= low < high <= 80


def test_without_volumes_only_ich_stratifies():
    rows, _ = make_rows()
    result = splits.make_splits(rows, folds=3, test_fraction=0.0, seed=0)
    assert result.test == () and result.tertile_edges_ml is None
    assert set(result.strata.values()) == {splits.NEGATIVE, splits.POSITIVE}


def test_deterministic_for_a_seed_and_independent_of_row_order():
    rows, volumes = make_rows()
    first = splits.make_splits(rows, 5, 0.2, seed=7, volumes=volumes)
    assert splits.make_splits(list(reversed(rows)), 5, 0.2, seed=7, volumes=volumes) == first
    assert splits.make_splits(rows, 5, 0.2, seed=8, volumes=volumes) != first


def test_too_small_a_cohort_is_refused_with_the_numbers():
    rows, _ = make_rows(n_patients=6, seed=2)
    positives = len({r.patient_id for r in rows if r.ich == 1})
    with pytest.raises(splits.SplitError) as caught:
        splits.make_splits(rows, folds=5, test_fraction=0.2, seed=0)
    message = str(caught.value)
    assert "requested --folds 5 --test_fraction 0.2" in message and f"({positives} ICH-positive)" in message
    assert "lower --folds or --test_fraction" in message
    with pytest.raises(splits.SplitError, match="--folds must be >= 2"):
        splits.make_splits(rows, folds=1, test_fraction=0.2, seed=0)
    with pytest.raises(splits.SplitError, match=r"--test_fraction must be in \[0, 1\)"):
        splits.make_splits(rows, folds=2, test_fraction=1.0, seed=0)


def test_cli_writes_the_layout_from_a_real_cohort(tmp_path, caplog):
    from synthetic import generate_cohort

    cohort = generate_cohort(tmp_path / "data", n_train=10, n_val=4, shape=(48, 48, 12), spacing=(2.0, 2.0, 5.0),
                             seed=1)
    out = tmp_path / "splits"
    argv = ["--csv", str(cohort.train_csv), str(cohort.val_csv), "--mask_dir", str(cohort.mask_dir),
            "--out_dir", str(out), "--folds", "2", "--test_fraction", "0.25", "--seed", "0"]
    assert splits.main(argv) == 0
    assert splits.list_folds(out) == [0, 1]
    source = {r["path"]: r for r in read(cohort.train_csv) + read(cohort.val_csv)}
    test = read(out / "test.csv")
    for k in (0, 1):
        train, val = read(out / f"fold_{k}" / "train.csv"), read(out / f"fold_{k}" / "val.csv")
        groups = [{r["patient_id"] for r in part} for part in (train, val, test)]
        assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
        assert len(train) + len(val) + len(test) == len(source)
        assert all(source[r["path"]] == r for r in train + val + test)  # rows copied as they were
        assert any(r["ich"] == "1" for r in val)
    table = read(out / "summary.csv")
    assert [r["part"] for r in table] == ["test", "fold_0 val", "fold_1 val"]
    assert "patients ICH+ small" in table[0] and "fold_1 val" in caplog.text
    before = {p: p.read_bytes() for p in out.rglob("*.csv")}
    assert splits.main(argv) == 0   # the same seed writes the same files
    assert {p: p.read_bytes() for p in out.rglob("*.csv")} == before


def test_cli_names_every_bad_row_and_positive_scan_without_mask(tmp_path, caplog):
    (tmp_path / "masks").mkdir()
    (tmp_path / "cohort.csv").write_text("path,ich,patient_id\na.pkl,1,P1\nb.pkl,2,P2\nc.pkl,0,\n")
    assert splits.main(["--csv", str(tmp_path / "cohort.csv"), "--out_dir", str(tmp_path / "out")]) == 1
    # Rows are counted as the file's lines (the header is row 1), as an editor shows them.
    assert "row 3: " in caplog.text and "ich must be 0 or 1, got '2'" in caplog.text
    assert "row 4: " in caplog.text and "patient_id is empty" in caplog.text
    (tmp_path / "cohort.csv").write_text("path,ich,patient_id\na.pkl,1,P1\nb.pkl,1,P2\n")
    assert splits.main(["--csv", str(tmp_path / "cohort.csv"), "--mask_dir", str(tmp_path / "masks"),
                        "--out_dir", str(tmp_path / "out")]) == 1
    assert "a.pkl" in caplog.text and "b.pkl" in caplog.text and "has no mask" in caplog.text
    assert not (tmp_path / "out").exists()


def test_list_folds_names_what_is_missing(tmp_path):
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "fold_0" / "train.csv").write_text("path,ich,patient_id\n")
    with pytest.raises(ValueError, match=r"fold_0/val.csv"):
        splits.list_folds(tmp_path)
    with pytest.raises(ValueError, match="found folds none"):
        splits.list_folds(tmp_path / "nothing")


def test_a_patient_is_positive_when_any_scan_is_and_ranked_by_the_largest_bleed():
    def row(n, ich, patient):
        return ScanRow("cohort", "/data/cohort.csv", n + 1, Path(f"/data/{n}.pkl"), ich, patient)

    rows = [row(0, 0, "A"), row(1, 1, "A"), row(2, 1, "B"), row(3, 1, "B"), row(4, 1, "C"), row(5, 0, "D")]
    volumes = {Path("/data/1.pkl"): 50.0, Path("/data/2.pkl"): 1.0, Path("/data/3.pkl"): 9.0,
               Path("/data/4.pkl"): 20.0, Path("/data/0.pkl"): 0.0, Path("/data/5.pkl"): 0.0}
    strata, edges = splits.patient_strata(rows, volumes)
    assert strata == {"A": "ICH+ large", "B": "ICH+ small", "C": "ICH+ medium", "D": splits.NEGATIVE}
    assert edges == pytest.approx((9.0 + (20.0 - 9.0) * 2 / 3, 20.0 + (50.0 - 20.0) / 3))
    result = splits.make_splits(rows, folds=2, test_fraction=0.0, seed=0, volumes=volumes)
    assert sorted(p for fold in result.folds for p in fold) == ["A", "B", "C", "D"]
