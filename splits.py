"""Patient-grouped, stratified splits of a cohort: a held-out test set and cross-validation folds.

    python splits.py --csv cohort.csv --out_dir splits --folds 5 --test_fraction 0.2 --seed 0
    python splits.py --csv train.csv val.csv --mask_dir masks --out_dir splits    # stratify by volume tertile too

writes::

    splits/test.csv                 held-out patients (never seen by training or model selection)
    splits/fold_<k>/train.csv       k = 0 .. folds-1: every other cross-validation patient
    splits/fold_<k>/val.csv         this fold's patients
    splits/summary.csv              what landed where (patients, scans, ICH+/-, volume tertiles)
    splits/splits.json              the request, the strata and each patient's part

Every scan of a patient lands in the same part. Patients are stratified by ICH (a patient is positive when any of
their scans is) and, with ``--mask_dir``, by the tertile of their largest hematoma volume among positive patients,
so each part gets its share of negative, small, medium and large bleeds. The assignment depends only on the seed
and the set of patients (not on row order). A cohort too small for the request is refused with the numbers.
CSVs are read by the training reader (``data.cohort.read_scan_csv``), volumes by the training readers and spacing
rule (``data.io``); written paths are absolute, so the CSVs work from any folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

import metrics
import reporting
import utils
from config import DataConfig
from data.cohort import REQUIRED_COLUMNS, ScanRow, read_scan_csv
from data.io import (MaskIndex, VolumeLoadError, in_image_axes, load_image_file, matching_axes, read_mask,
                     resolve_spacing)
from data.records import Problem

logger = logging.getLogger("ichseg.splits")

TEST_CSV = "test.csv"
TRAIN_CSV, VAL_CSV = "train.csv", "val.csv"
NEGATIVE, POSITIVE = "ICH-", "ICH+"
TERTILES = ("ICH+ small", "ICH+ medium", "ICH+ large")
STRATA = (NEGATIVE, POSITIVE, *TERTILES)  # the order of tables and of the assignment


class SplitError(ValueError):
    """The cohort cannot be split as requested; ``problems`` has one line per problem."""

    def __init__(self, problems: Sequence[object]):
        self.problems = [str(p) for p in problems]
        super().__init__("cannot split the cohort:\n" + "\n".join(f"  - {p}" for p in self.problems))


def fold_dir(folds_dir: str | os.PathLike, fold: int) -> Path:
    return Path(folds_dir) / f"fold_{fold}"


def list_folds(folds_dir: str | os.PathLike) -> list[int]:
    """Fold numbers 0..K-1 found in a folder this tool wrote; ValueError naming what is missing otherwise."""
    folds_dir = Path(folds_dir)
    found = sorted(int(p.name[5:]) for p in folds_dir.glob("fold_*") if p.name[5:].isdigit())
    incomplete = [str(fold_dir(folds_dir, k) / name) for k in found for name in (TRAIN_CSV, VAL_CSV)
                  if not (fold_dir(folds_dir, k) / name).is_file()]
    if not found or found != list(range(len(found))) or incomplete:
        raise ValueError(f"--folds_dir {folds_dir}: expected fold_0 .. fold_<K-1>, each with {TRAIN_CSV} and "
                         f"{VAL_CSV} (write them with splits.py); found folds {found or 'none'}"
                         + (f", missing {', '.join(incomplete)}" if incomplete else ""))
    return found


@dataclass(frozen=True)
class Splits:
    """Which part each patient went to: ``test`` patients and ``folds[k]`` (fold k's validation patients)."""

    test: tuple[str, ...]
    folds: tuple[tuple[str, ...], ...]
    strata: Mapping[str, str]          # patient -> stratum label
    tertile_edges_ml: tuple[float, float] | None


def read_cohort(csv_paths: Sequence[str | os.PathLike]) -> list[ScanRow]:
    """Every row of the given cohort CSVs (the training reader); SplitError listing every problem."""
    problems: list[Problem] = []
    rows: list[ScanRow] = []
    for csv_path in csv_paths:
        rows += read_scan_csv(csv_path, "cohort", problems)
    seen: dict[Path, ScanRow] = {}
    for row in rows:
        if row.image_path in seen:
            problems.append(Problem(str(row.image_path), f"listed twice (also {seen[row.image_path].where})",
                                    row.csv, row.row))
        seen.setdefault(row.image_path, row)
    if problems:
        raise SplitError(problems)
    return rows


def hematoma_volumes(rows: Sequence[ScanRow], mask_dir: str | os.PathLike,
                     fallback_spacing: Sequence[float] = DataConfig().spacing) -> dict[Path, float]:
    """Hematoma volume (mL) of each ICH-positive scan from its mask, with the training spacing rule; negatives 0.
    SplitError listing every positive scan without a readable, shape-compatible mask."""
    masks = MaskIndex(mask_dir)
    problems: list[Problem] = []

    def volume(row: ScanRow) -> float:
        if row.ich != 1:
            return 0.0
        try:
            mask_path = masks.find(row.image_path)
            if mask_path is None:
                raise VolumeLoadError(row.image_path, f"ICH-positive scan has no mask in {mask_dir}")
            mask, mask_spacing, _, _, _ = read_mask(mask_path)
            image, meta = load_image_file(row.image_path)
        except VolumeLoadError as error:
            problems.append(Problem(error.path, error.reason, row.csv, row.row))
            return math.nan
        axes = matching_axes(image.shape, mask.shape)
        spacing, _ = resolve_spacing(meta["spacing"], in_image_axes(mask_spacing, axes), fallback_spacing)
        return metrics.volume_ml(mask, spacing)

    with ThreadPoolExecutor(max_workers=max(1, min(4, utils.usable_cpu_count()))) as pool:
        volumes = dict(zip((r.image_path for r in rows), pool.map(volume, rows)))
    if problems:
        raise SplitError(problems)
    return volumes


def patient_strata(rows: Sequence[ScanRow], volumes: Mapping[Path, float] | None
                   ) -> tuple[dict[str, str], tuple[float, float] | None]:
    """Each patient's stratum: ICH- (no positive scan), else ICH+ (with volumes: the tertile of the patient's
    largest hematoma among positive patients). Returns (patient -> stratum, tertile edges in mL or None)."""
    positive: dict[str, bool] = {}
    largest: dict[str, float] = {}
    for row in rows:
        positive[row.patient_id] = positive.get(row.patient_id, False) or row.ich == 1
        if volumes is not None and row.ich == 1:
            largest[row.patient_id] = max(largest.get(row.patient_id, 0.0), volumes[row.image_path])
    if volumes is None or not largest:
        return {p: (POSITIVE if pos else NEGATIVE) for p, pos in positive.items()}, None
    low, high = (float(q) for q in np.quantile(sorted(largest.values()), [1 / 3, 2 / 3]))
    strata = {}
    for patient, pos in positive.items():
        if not pos:
            strata[patient] = NEGATIVE
        else:
            ml = largest[patient]
            strata[patient] = TERTILES[0] if ml <= low else TERTILES[1] if ml <= high else TERTILES[2]
    return strata, (low, high)


def _test_quota(sizes: Mapping[str, int], n_test: int) -> dict[str, int]:
    """Test patients per stratum, proportional to its size (largest remainder; ties by stratum name)."""
    total = sum(sizes.values())
    exact = {s: n * n_test / total for s, n in sizes.items()}
    quota = {s: int(math.floor(v)) for s, v in exact.items()}
    order = sorted(sizes, key=lambda s: (-(exact[s] - quota[s]), s))
    for stratum in order[: n_test - sum(quota.values())]:
        quota[stratum] += 1
    return quota


def make_splits(rows: Sequence[ScanRow], folds: int, test_fraction: float, seed: int,
                volumes: Mapping[Path, float] | None = None) -> Splits:
    """Assign patients to the test set and to ``folds`` validation folds, stratified (see the module docstring).

    Raises SplitError naming every reason the cohort is too small for the request: each fold needs at least one
    ICH-positive validation patient (validation Dice is measured on positive scans) and the test set one positive
    patient when ``test_fraction`` > 0."""
    if folds < 2:
        raise SplitError([f"--folds must be >= 2, got {folds}"])
    if not 0.0 <= test_fraction < 1.0:
        raise SplitError([f"--test_fraction must be in [0, 1), got {test_fraction}"])
    strata, edges = patient_strata(rows, volumes)
    by_stratum: dict[str, list[str]] = {}
    for patient in sorted(strata):
        by_stratum.setdefault(strata[patient], []).append(patient)
    n_patients = len(strata)
    n_positive = sum(s != NEGATIVE for s in strata.values())
    n_test = 0 if test_fraction == 0 else max(1, round(test_fraction * n_patients))
    quota = _test_quota({s: len(p) for s, p in by_stratum.items()}, n_test)
    if n_test and n_positive and not any(quota[s] for s in quota if s != NEGATIVE):
        # Proportional rounding gave the test set no positive patient: the report would have no Dice.
        donor = max(quota, key=lambda s: (quota[s], s))
        quota[donor] -= 1
        quota[max((s for s in quota if s != NEGATIVE), key=lambda s: (len(by_stratum[s]), s))] += 1

    problems = []
    positive_test = sum(quota[s] for s in quota if s != NEGATIVE)
    if n_test and positive_test == 0:
        problems.append(f"the test set would hold no ICH-positive patient: the cohort has {n_positive}")
    if n_positive - positive_test < folds:
        problems.append(f"{n_positive - positive_test} ICH-positive patient(s) remain for cross-validation after "
                        f"{positive_test} go to the test set, fewer than --folds {folds}: every validation fold "
                        "needs one (its Dice is measured on positive scans); lower --folds or --test_fraction")
    if n_patients - n_test < folds:
        problems.append(f"{n_patients - n_test} patient(s) remain for cross-validation, fewer than --folds {folds}")
    if problems:
        raise SplitError([f"{len(rows)} scans of {n_patients} patients ({n_positive} ICH-positive), requested "
                          f"--folds {folds} --test_fraction {test_fraction}:", *problems])

    rng = np.random.default_rng(seed)
    scans = Counter(row.patient_id for row in rows)
    test: list[str] = []
    fold_patients: list[list[str]] = [[] for _ in range(folds)]
    fold_scans = [0] * folds
    for stratum in (s for s in STRATA if s in by_stratum):
        shuffled = [by_stratum[stratum][i] for i in rng.permutation(len(by_stratum[stratum]))]
        test += shuffled[: quota[stratum]]
        for patient in shuffled[quota[stratum]:]:
            # Fewest patients of this stratum first, then fewest scans, then the lowest fold number.
            counts = [sum(strata[p] == stratum for p in fold) for fold in fold_patients]
            k = min(range(folds), key=lambda i: (counts[i], fold_scans[i], i))
            fold_patients[k].append(patient)
            fold_scans[k] += scans[patient]
    return Splits(test=tuple(sorted(test)), folds=tuple(tuple(sorted(f)) for f in fold_patients), strata=strata,
                  tertile_edges_ml=edges)


def _write_rows(path: Path, rows: Sequence[ScanRow]) -> None:
    reporting.write_table_csv(path, [{"path": str(r.image_path), "ich": r.ich, "patient_id": r.patient_id}
                                     for r in rows], key_column="path")


def summary_rows(rows: Sequence[ScanRow], splits: Splits) -> list[dict[str, object]]:
    """One row per part (test, fold_k val): patients, scans, ICH+/ICH- scans and patients per stratum."""
    parts = ([("test", splits.test)] if splits.test else []) + [
        (f"fold_{k} val", fold) for k, fold in enumerate(splits.folds)]
    strata = [s for s in STRATA if s in set(splits.strata.values())]
    table = []
    for name, patients in parts:
        members = set(patients)
        scans = [r for r in rows if r.patient_id in members]
        row: dict[str, object] = {"part": name, "patients": len(members), "scans": len(scans),
                                  "ich_positive_scans": sum(r.ich == 1 for r in scans),
                                  "ich_negative_scans": sum(r.ich == 0 for r in scans)}
        row.update({f"patients {s}": sum(splits.strata[p] == s for p in members) for s in strata})
        table.append(row)
    return table


def format_table(table: Sequence[Mapping[str, object]]) -> str:
    columns = list(table[0])
    widths = [max(len(str(c)), *(len(str(r[c])) for r in table)) for c in columns]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(str(r[c]).rjust(w) for c, w in zip(columns, widths)) for r in table]
    return "\n".join(lines)


def write_splits(rows: Sequence[ScanRow], splits: Splits, out_dir: str | os.PathLike,
                 settings: Mapping[str, object]) -> list[dict[str, object]]:
    """Write test.csv, fold_<k>/{train,val}.csv, summary.csv and splits.json; returns the summary table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def of_patients(patients: Sequence[str]) -> list[ScanRow]:
        members = set(patients)
        return [r for r in rows if r.patient_id in members]  # in CSV order

    if splits.test:
        _write_rows(out_dir / TEST_CSV, of_patients(splits.test))
    for k, fold in enumerate(splits.folds):
        others = [p for j, f in enumerate(splits.folds) if j != k for p in f]
        fold_dir(out_dir, k).mkdir(exist_ok=True)
        _write_rows(fold_dir(out_dir, k) / TRAIN_CSV, of_patients(others))
        _write_rows(fold_dir(out_dir, k) / VAL_CSV, of_patients(fold))
    table = summary_rows(rows, splits)
    reporting.write_table_csv(out_dir / "summary.csv", table, key_column="part")
    manifest = {**settings, "tertile_edges_ml": splits.tertile_edges_ml, "test": list(splits.test),
                "folds": [list(f) for f in splits.folds], "strata": dict(sorted(splits.strata.items()))}
    utils.atomic_write_text(out_dir / "splits.json", json.dumps(reporting.to_jsonable(manifest), indent=2) + "\n")
    return table


def split_cohort(csv_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, folds: int = 5,
                 test_fraction: float = 0.2, seed: int = 0, mask_dir: str | os.PathLike | None = None,
                 volumes: Mapping[Path, float] | None = None) -> list[dict[str, object]]:
    """Read, split and write (the CLI's whole job); ``volumes`` (mL per image path) spares reading the masks when
    the caller already has them. Returns the summary table; SplitError for an unusable cohort or request."""
    rows = read_cohort(csv_paths)
    if volumes is None and mask_dir is not None:
        volumes = hematoma_volumes(rows, mask_dir)
    splits = make_splits(rows, folds, test_fraction, seed, volumes)
    settings = {"csv": [str(Path(c).resolve()) for c in csv_paths], "mask_dir": mask_dir, "folds": folds,
                "test_fraction": test_fraction, "seed": seed}
    table = write_splits(rows, splits, out_dir, settings)
    edges = (f"; volume tertiles of ICH+ patients: <= {splits.tertile_edges_ml[0]:.1f} mL, <= "
             f"{splits.tertile_edges_ml[1]:.1f} mL, larger" if splits.tertile_edges_ml else "")
    logger.info("split %d scans of %d patients into %s%d folds (seed %d)%s; wrote %s\n%s", len(rows),
                len(splits.strata), f"a test set of {len(splits.test)} patients and " if splits.test else "", folds,
                seed, edges, out_dir, format_table(table))
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splits.py", description=__doc__.split("\n")[0])
    parser.add_argument("--csv", nargs="+", required=True,
                        help=f"Cohort CSV(s) with columns {','.join(REQUIRED_COLUMNS)} (e.g. all scans, or an "
                             "existing train.csv and val.csv together).")
    parser.add_argument("--out_dir", required=True, help="Folder for test.csv and fold_<k>/{train,val}.csv.")
    parser.add_argument("--folds", type=int, default=5, help="Cross-validation folds (default: 5).")
    parser.add_argument("--test_fraction", type=float, default=0.2,
                        help="Share of patients held out as the test set; 0 for none (default: 0.2).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the assignment (default: 0).")
    parser.add_argument("--mask_dir", default=None,
                        help="Masks (training naming rule): also stratify by hematoma-volume tertile.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    utils.setup_logging(None)
    try:
        split_cohort(args.csv, args.out_dir, args.folds, args.test_fraction, args.seed, args.mask_dir)
    except (SplitError, VolumeLoadError) as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
