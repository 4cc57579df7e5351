"""Reading the cohort CSVs and validating every file before any model is built.

``read_scan_csv`` is the one CSV reader (training, ``predict.py`` and split tools alike); ``validate_cohort`` reads
each image and mask once, reports every problem at once as ``<csv> row <n>: <file>: <problem>`` and keeps what it
learned (spacing, mask transpose, content hash, per-scan statistics) in the returned ``Cohort``.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from config import DataConfig
from data.budget import cache_bytes, cache_problem, preprocessing_problem, reading_problem
from data.geometry import (OVERRIDE_FLAG, MaskOrientation, align_mask, label_findings, label_problem,
                           orient_mask)
from data.io import (MaskIndex, VolumeLoadError, case_id_from_path, content_digest, in_image_axes,
                     looks_preprocessed, mask_key, read_image, read_mask, resolve_spacing)
from data.normalization import NORMALIZATIONS
from data.records import Case, Cohort, DataValidationError, Problem
from data.stats import scan_stats
from utils import usable_cpu_count

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "ich", "patient_id")
_MAX_LISTED = 50


@dataclass(frozen=True)
class ScanRow:
    """One row of a scan CSV: ``row`` is its line in the file as editors number it (the header is line 1),
    ``image_path`` absolute (relative paths are resolved against the CSV's folder), ``ich`` 0/1 or None (missing or
    invalid), ``patient_id`` stripped."""

    split: str
    csv: str
    row: int
    image_path: Path
    ich: int | None
    patient_id: str

    @property
    def where(self) -> str:
        return f"{Path(self.csv).name} row {self.row}"


def _parse_ich(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def read_scan_csv(csv_path: str | os.PathLike, split: str, problems: list[Problem],
                  required: Sequence[str] = REQUIRED_COLUMNS) -> list[ScanRow]:
    """Rows of a ``path,ich,patient_id`` CSV; every problem is appended to ``problems`` (nothing raises).

    Cells are read as text: surrounding whitespace is ignored and blanks stay blank (never NaN); blank lines are
    skipped but counted, so ``row`` is the file's line number (header = line 1). Columns outside
    ``required`` may be absent (``predict.py`` needs only ``path``); a present ``ich`` must be 0 or 1 where it is
    required or not blank, and ``patient_id`` may be blank only when not required. ``split`` names the CSV in the
    messages ("train", "val", "input").
    """
    csv_path = Path(os.path.abspath(Path(csv_path).expanduser()))
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True,
                            skip_blank_lines=False)  # kept, so a row's index gives its line in the file
    except FileNotFoundError:
        problems.append(Problem(str(csv_path), f"{split} CSV not found"))
        return []
    except pd.errors.EmptyDataError:
        problems.append(Problem(str(csv_path), f"{split} CSV is empty; expected the header "
                                               f"{','.join(REQUIRED_COLUMNS)}"))
        return []
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        problems.append(Problem(str(csv_path), f"cannot read the {split} CSV ({exc})"))
        return []
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        problems.append(Problem(str(csv_path), f"missing column(s) {', '.join(missing)}: expected the header "
                                               f"{','.join(REQUIRED_COLUMNS)}, found "
                                               f"{','.join(frame.columns) or 'none'}"))
        return []
    if frame.empty:
        problems.append(Problem(str(csv_path), f"{split} CSV has a header but no rows"))
        return []
    blank = [""] * len(frame)
    empty_lines = frame.apply(lambda cells: all(not str(c).strip() for c in cells), axis=1)
    if empty_lines.all():
        problems.append(Problem(str(csv_path), f"{split} CSV has a header but no rows"))
        return []
    rows = []
    # Line 1 is the header, so the first data line is line 2.
    for number, (path_text, ich_text, patient) in enumerate(
            zip(frame["path"], frame.get("ich", blank), frame.get("patient_id", blank)), start=2):
        if empty_lines.iloc[number - 2]:
            continue
        path_text, ich_text, patient = path_text.strip(), ich_text.strip(), patient.strip()
        if not path_text:
            problems.append(Problem("(no path)", "the path is empty", str(csv_path), number))
            continue
        path = Path(path_text).expanduser()
        path = Path(os.path.abspath(path if path.is_absolute() else csv_path.parent / path))
        ich = _parse_ich(ich_text)
        if ich is None and ("ich" in required or ich_text):
            problems.append(Problem(str(path), f"ich must be 0 or 1, got {ich_text!r}", str(csv_path), number))
        if not patient and "patient_id" in required:
            problems.append(Problem(str(path), "patient_id is empty", str(csv_path), number))
        rows.append(ScanRow(split, str(csv_path), number, path, ich, patient))
    return rows


@dataclass
class _Inspection:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    mask_255: str | None = None
    fallback_spacing: str | None = None
    ich_mismatch: str | None = None
    cache_bytes: int = 0
    case: Case | None = None
    stats: dict[str, Any] | None = None


def _drop_duplicates(rows: list[ScanRow], problems: list[Problem]) -> list[ScanRow]:
    """Each scan once: a repeated path, or two scans with the same file number (they would share a mask and a
    case_id), is an error; only the first occurrence is inspected."""
    by_path: dict[str, ScanRow] = {}
    by_number: dict[str, ScanRow] = {}
    kept = []
    for row in rows:
        path_key = os.path.normcase(str(row.image_path))
        number = mask_key(case_id_from_path(row.image_path))
        if path_key in by_path:
            problems.append(Problem(str(row.image_path), f"duplicate row: the same scan is already listed at "
                                                         f"{by_path[path_key].where}", row.csv, row.row))
        elif number in by_number:
            other = by_number[number]
            problems.append(Problem(str(row.image_path), f"file number {case_id_from_path(row.image_path)} is also "
                                                         f"used by {other.image_path} ({other.where}); masks are "
                                                         "matched by file number, so each scan needs its own",
                                    row.csv, row.row))
        else:
            by_path[path_key] = row
            by_number[number] = row
            kept.append(row)
    return kept



def _inspect_row(row: ScanRow, masks: MaskIndex | None, data_config: DataConfig) -> _Inspection:
    """Read one scan (and its mask) once; collect its problems, warnings, resolved geometry and statistics."""
    found = _Inspection()

    def problem(file: str | Path, message: str) -> None:
        found.problems.append(Problem(str(file), message, row.csv, row.row))

    case_id = case_id_from_path(row.image_path)
    matches = masks.matches(row.image_path) if masks is not None else []
    mask_path = matches[0] if len(matches) == 1 else None
    if len(matches) > 1:
        problem(row.image_path, f"several masks match file number {case_id}: "
                                f"{', '.join(m.name for m in matches)}; keep one")
    elif mask_path is None and row.ich == 1:
        where = f"in {data_config.mask_dir}" if data_config.mask_dir is not None else "(no mask_dir given)"
        problem(row.image_path, f"ICH-positive scan has no mask {where}: looked for {case_id}.nii or "
                                f"{case_id}.nii.gz (leading zeros ignored)")

    too_large = reading_problem(row.image_path)  # sized from its header: a huge file is not read whole to check it
    if too_large is not None:
        problem(row.image_path, too_large)
        return found
    volume = mask = None
    try:
        volume, meta, image_digest = read_image(row.image_path, digest=True)
    except VolumeLoadError as exc:
        problem(exc.path, exc.reason)
    if mask_path is not None:
        try:
            mask, mask_spacing, mask_digest, was_255, mask_affine = read_mask(mask_path)
        except VolumeLoadError as exc:
            problem(exc.path, exc.reason)
    if volume is None or (mask_path is not None and mask is None):
        return found

    orientation = None
    if mask is not None:
        orientation = _aligned_orientation(row, volume, meta["affine"], mask, mask_path, mask_affine,
                                           data_config.allow_unusual_masks, found)
        if orientation is None:
            return found
        mask = orient_mask(mask, orientation)

    mask_spacing_img = in_image_axes(mask_spacing, orientation.axes) if orientation is not None else None
    spacing, source = resolve_spacing(meta["spacing"], mask_spacing_img, data_config.spacing)
    if source == "fallback":
        found.fallback_spacing = str(row.image_path)
    elif source == "image" and mask_spacing_img is not None and not np.allclose(spacing, mask_spacing_img,
                                                                                 rtol=0.01):
        found.warnings.append(f"{row.image_path}: spacing {spacing} mm from the image differs from the mask "
                              f"header's {tuple(round(s, 4) for s in mask_spacing_img)} mm; using the image's")
    if any(s < 0.1 or s > 20.0 for s in spacing):
        found.warnings.append(f"{row.image_path}: voxel spacing {spacing} mm ({source}) is outside 0.1-20 mm; "
                              "check the units")
    reason = looks_preprocessed(volume)
    if reason is not None:
        found.warnings.append(f"{row.image_path}: {reason}; expected raw HU")
    normalization = NORMALIZATIONS.get(data_config.normalization)
    unusable = normalization.problem(volume, data_config.hu_window) if normalization is not None else None
    if unusable is not None:
        problem(row.image_path, unusable)
    target_shape, too_large = preprocessing_problem(volume.shape, spacing, data_config.target_spacing)
    if too_large is not None:
        problem(row.image_path, too_large)
    found.cache_bytes = cache_bytes(target_shape)

    blood = int(np.count_nonzero(mask)) if mask is not None else 0
    voxel_ml = float(np.prod(spacing)) / 1000.0
    if mask is None:
        pass  # no mask: fine for ICH-negative scans; a positive one was reported above
    elif row.ich == 1 and blood == 0:
        found.ich_mismatch = f"{row.where} {row.image_path}: ich=1 but the mask {mask_path.name} is empty"
    elif row.ich == 0 and blood > 0:
        found.ich_mismatch = (f"{row.where} {row.image_path}: ich=0 but the mask {mask_path.name} marks "
                              f"{blood} voxels ({blood * voxel_ml:.1f} mL)")
    if mask is not None and was_255:
        found.mask_255 = str(mask_path)
    if row.ich == 1 and blood > 0:
        if data_config.allow_unusual_masks:
            unusual = label_findings(volume, mask)
            if unusual is not None:
                found.warnings.append(f"{mask_path}: {unusual} (kept: {OVERRIDE_FLAG})")
        else:
            unusual = label_problem(volume, mask)
            if unusual is not None:
                problem(mask_path, unusual)
    if row.ich is None or not row.patient_id or found.problems:
        return found

    fingerprint = content_digest(f"{image_digest}:{mask_digest if mask is not None else '-'}".encode())
    found.case = Case(image_path=str(row.image_path), mask_path=str(mask_path) if mask_path else None,
                      ich=row.ich, patient_id=row.patient_id, case_id=case_id, csv_path=row.csv, row=row.row,
                      spacing=spacing, spacing_source=source,
                      mask_axes=orientation.axes if orientation is not None else (0, 1, 2),
                      mask_flips=orientation.flips if orientation is not None else (0, 0, 0),
                      fingerprint=fingerprint)
    found.stats = scan_stats(volume, blood, spacing, source, row.split, row.ich)
    return found


def _aligned_orientation(row: ScanRow, volume: np.ndarray, image_affine: np.ndarray | None, mask: np.ndarray,
                         mask_path: Path, mask_affine: np.ndarray | None, allow_unusual: bool,
                         found: _Inspection) -> MaskOrientation | None:
    """How the mask goes onto the image's grid (``data.geometry.align_mask``); records the warnings and problems.
    None when no orientation fits the image's shape (nothing else about the mask can be checked then)."""
    alignment = align_mask(image_affine, mask_affine, mask.shape, volume.shape)
    orientation = alignment.orientation
    if orientation is None:
        found.problems.append(Problem(str(mask_path), f"{alignment.disagreement} ({row.image_path.name})", row.csv,
                                      row.row))
        return None
    if alignment.from_affines and not orientation.is_identity:
        found.warnings.append(f"{mask_path}: stored in another orientation than {row.image_path} (their affines "
                              f"say so); brought the mask into the image's voxel grid ({orientation.describe()})")
    elif not orientation.is_identity:
        tie = " (equal-size axes kept in stored order; check the orientation)" if len(set(volume.shape)) < 3 else ""
        found.warnings.append(f"{mask_path}: mask shape {mask.shape} is the image's {volume.shape} with the axes "
                              f"reordered; transposed the mask with axes {orientation.axes} to match "
                              f"{row.image_path}{tie}")
    if alignment.disagreement is not None and allow_unusual:
        found.warnings.append(f"{mask_path}: {alignment.disagreement}; used voxel for voxel ({OVERRIDE_FLAG})")
    elif alignment.disagreement is not None:
        found.problems.append(Problem(
            str(mask_path), f"{alignment.disagreement} (image {row.image_path.name}): the mask does not lie on the "
                            "image's voxels. Re-save it on the image's grid; if only its header is wrong, pass "
                            f"{OVERRIDE_FLAG}", row.csv, row.row))
    return orientation


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _io_threads(n_items: int) -> int:
    """Threads for reading volumes: file reads, gzip and most numpy work release the GIL."""
    return max(1, min(8, usable_cpu_count(), n_items))


def _raise_sorted(problems: list[Problem], rows: Sequence[ScanRow]) -> None:
    """Raise DataValidationError with the problems read like the CSVs: file-level problems first, then train rows,
    then val rows, in row order."""
    csv_order: dict[str, int] = {}
    for row in rows:
        csv_order.setdefault(row.csv, len(csv_order))
    problems.sort(key=lambda p: (p.row is not None, csv_order.get(p.csv or "", -1), p.row or 0))
    raise DataValidationError(problems)


def validate_cohort(data_config: DataConfig) -> Cohort:
    """Read and check the whole cohort before any model is built; raise once with every problem.

    Errors (collected into one DataValidationError, each naming file and CSV row): missing/unreadable CSV or
    columns, ich not 0/1, empty patient_id, duplicate rows, two scans with one file number, missing/unreadable/
    unsafe image files, bad image arrays (see load_image_file), ICH-positive scan without a mask, several masks for
    one file number, non-binary / NaN masks, image-mask shapes that are not an axis permutation of each other, the
    same patient_id in train and val (unless ``allow_patient_overlap``), a scan the normalisation cannot use (no
    head voxel above the window floor), a file or a preprocessed volume too large for the RAM available, a cache
    too large for the disk of ``cache_dir`` (``data.budget``); unless ``allow_unusual_masks``: a mask whose grid
    disagrees with the image's (origin, voxel size or direction, when both carry an affine) and an ICH-positive
    mask that does not lie on blood (``data.geometry.label_problem``).

    Warnings (returned in ``Cohort.warnings``, not logged: the caller logs them once): 0/255 masks read as 0/1, mask
    transposed or reoriented (from the affines) onto the image's grid, fallback spacing used, image/mask spacing
    disagreement, implausible spacing, data that does not look like raw HU, ich label disagreeing with the mask,
    allowed patient overlap, and the mask problems above when ``allow_unusual_masks`` keeps them.

    Relative CSV paths are resolved against the CSV's folder. Every image and mask is read exactly once (in a
    thread pool); what is learned (spacing, mask transpose, content hash, HU histogram, blood volume) is kept in
    the Cases and in ``Cohort.case_stats``.
    """
    started = time.perf_counter()
    problems: list[Problem] = []
    rows: list[ScanRow] = []
    for split, csv in (("train", data_config.train_csv), ("val", data_config.val_csv)):
        if csv is None:
            problems.append(Problem(f"{split}_csv", f"no {split} CSV given (--{split}_csv)"))
        else:
            rows += read_scan_csv(csv, split, problems)
    masks = None
    if data_config.mask_dir is not None:
        try:
            masks = MaskIndex(data_config.mask_dir)
        except VolumeLoadError:
            problems.append(Problem(str(Path(data_config.mask_dir).expanduser()), "mask_dir is not a folder"))
    unique = _drop_duplicates(rows, problems)
    with ThreadPoolExecutor(max_workers=_io_threads(len(unique))) as pool:
        inspections = list(pool.map(lambda r: _inspect_row(r, masks, data_config), unique))

    warnings: list[str] = []
    for inspection in inspections:
        problems += inspection.problems
        warnings += inspection.warnings
    masks_255 = [i.mask_255 for i in inspections if i.mask_255]
    if masks_255:
        warnings.append(f"{len(masks_255)} mask(s) hold 0/255 values and were read as 0/1: {_listing(masks_255)}")
    fallback = [i.fallback_spacing for i in inspections if i.fallback_spacing]
    if fallback:
        warnings.append(f"{len(fallback)} scan(s) carry no voxel spacing (no 'spacing'/'affine' in the file, no "
                        f"informative mask header); used the fallback spacing {tuple(data_config.spacing)} mm "
                        f"for: {_listing(fallback)}")
    mismatches = [i.ich_mismatch for i in inspections if i.ich_mismatch]
    if mismatches:
        warnings.append(f"{len(mismatches)} scan(s) whose ich label disagrees with the mask (kept as given; check "
                        "the labels):\n    " + "\n    ".join(mismatches[:_MAX_LISTED]))

    patients: dict[str, dict[str, list[ScanRow]]] = {"train": {}, "val": {}}
    for row in rows:
        if row.patient_id:
            patients[row.split].setdefault(row.patient_id, []).append(row)
    overlap = sorted(set(patients["train"]) & set(patients["val"]))
    if overlap and not data_config.allow_patient_overlap:
        for patient in overlap:
            first = patients["val"][patient][0]
            train_rows = ", ".join(str(r.row) for r in patients["train"][patient])
            problems.append(Problem(str(first.image_path), f"patient_id {patient!r} is also in the train CSV (rows "
                                                           f"{train_rows}): patient leakage inflates validation "
                                                           "scores; split by patient or pass "
                                                           "--allow_patient_overlap", first.csv, first.row))
    elif overlap:
        warnings.append(f"{len(overlap)} patient(s) are in both train and val (allowed by allow_patient_overlap; "
                        f"validation scores will be optimistic): {_listing(overlap)}")

    if data_config.cache_dir is not None:
        no_room = cache_problem(sum(i.cache_bytes for i in inspections), data_config.cache_dir)
        if no_room is not None:
            problems.append(Problem(str(Path(data_config.cache_dir).expanduser()), no_room))

    if problems:
        _raise_sorted(problems, rows)
    train = [i.case for r, i in zip(unique, inspections) if r.split == "train" and i.case is not None]
    val = [i.case for r, i in zip(unique, inspections) if r.split == "val" and i.case is not None]
    stats = {i.case.case_id: i.stats for i in inspections if i.case is not None and i.stats is not None}
    # The warnings are returned, not logged: the caller logs them once (train.py on rank 0 only).
    logger.info("validated %d scans (train %d, val %d) in %.1f s", len(train) + len(val), len(train), len(val),
                time.perf_counter() - started)
    return Cohort(train=train, val=val, warnings=warnings, case_stats=stats)

