"""The public PhysioNet CT-ICH data set in this project's format, checked and split, in one command.

    python prepare_ctich.py --root ct-ich/ --out_dir data/ctich [--folds 5 --test_fraction 0.2 --seed 0]

Reads the layout of the PhysioNet download ("Computed Tomography Images for Intracranial Hemorrhage Detection and
Segmentation")::

    <root>/ct_scans/049.nii                   raw HU volumes (NIfTI)
    <root>/masks/049.nii                      hemorrhage masks (0/1, or 0/255 in some releases)
    <root>/hemorrhage_diagnosis_raw_ct.csv    one row per slice: PatientNumber, SliceNumber, Intraventricular,
                                              Intraparenchymal, Subarachnoid, Epidural, Subdural, No_Hemorrhage,
                                              Fracture_Yes_No

and writes::

    <out_dir>/cohort.csv          path,ich,patient_id: a scan is ICH-positive when any of its slices has
                                  No_Hemorrhage = 0; patient_id is PatientNumber; paths point at the downloaded
                                  images (absolute; nothing large is copied)
    <out_dir>/masks/049.nii.gz    binary 0/1 uint8 masks in the image's grid, with the image's affine
    <out_dir>/splits/             test.csv and fold_<k>/{train,val}.csv (splits.py: patient-grouped, stratified by
                                  ICH and hematoma-volume tertile)

Before anything is written every scan is read once (the training readers, ``data.io``) and every problem is reported
at once: numbers missing from the images, the masks or the CSV, unreadable files, values in the CSV, masks that are
not binary or do not lie on the image's voxels (shape, voxel size, origin or direction: the validator's rule,
``data.geometry.align_mask``; the masks written carry the image's affine, so this is the last place it can be seen),
images that do not look like raw HU. Softer findings (0/255 masks, masks stored in another orientation, a slice
count that differs from the CSV's, labels that disagree with the mask, a positive mask that does not lie on blood)
are logged as warnings. The CSVs pass ``dataloader.validate_cohort``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd

import metrics
import reporting
import utils
from data.geometry import MaskOrientation, align_mask, label_problem, orient_mask
from data.io import (MASK_SUFFIXES, VolumeLoadError, case_id_from_path, in_image_axes, looks_preprocessed,
                     mask_key, read_image, read_mask, resolve_spacing)
from data.records import Problem
from splits import SplitError, split_cohort

logger = logging.getLogger("ichseg.prepare_ctich")

IMAGES_DIR, MASKS_DIR = "ct_scans", "masks"
LABELS_CSV = "hemorrhage_diagnosis_raw_ct.csv"
LABEL_COLUMNS = ("PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural",
                 "Subdural", "No_Hemorrhage", "Fracture_Yes_No")
REQUIRED_COLUMNS = ("PatientNumber", "SliceNumber", "No_Hemorrhage")  # what the conversion uses


class PrepareError(ValueError):
    """The download cannot be converted; ``problems`` lists every problem found."""

    def __init__(self, problems: Sequence[Problem | str]):
        self.problems = [str(p) for p in problems]
        super().__init__(f"the CT-ICH folder has {len(self.problems)} problem(s); nothing was written:\n"
                         + "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class Scan:
    """One scan of the download: from the CSV (number, patient, ich, slice rows) and the two folders."""

    number: str
    patient_id: str
    ich: int
    csv_slices: int
    image: Path | None = None
    mask: Path | None = None
    # Filled by inspect_scan:
    affine: np.ndarray | None = None
    orientation: MaskOrientation = MaskOrientation()  # the mask into the image's grid (data.geometry.align_mask)
    volume_ml: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_labels(csv_path: Path, problems: list[Problem]) -> dict[str, Scan]:
    """Scans by file number (leading zeros ignored) from the per-slice label CSV; problems appended."""
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True,
                            skip_blank_lines=False)  # kept, so a row's index gives its line in the file
    except FileNotFoundError:
        problems.append(Problem(str(csv_path), "label CSV not found (the download's per-slice diagnosis table)"))
        return {}
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        problems.append(Problem(str(csv_path), f"cannot read the label CSV ({error})"))
        return {}
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        problems.append(Problem(str(csv_path), f"missing column(s) {', '.join(missing)}; expected the header "
                                               f"{','.join(LABEL_COLUMNS)}, found {','.join(frame.columns)}"))
        return {}
    scans: dict[str, Scan] = {}
    # ``row`` is the line in the file as editors number it (the header is line 1), as everywhere in the project
    # (``data.records.Problem``); blank lines are skipped but counted.
    for row, (patient, slice_number, no_hemorrhage) in enumerate(
            zip(frame["PatientNumber"], frame["SliceNumber"], frame["No_Hemorrhage"]), start=2):
        patient, slice_number, no_hemorrhage = patient.strip(), slice_number.strip(), no_hemorrhage.strip()
        if not (patient or slice_number or no_hemorrhage) and not "".join(frame.iloc[row - 2]).strip():
            continue
        bad = [f"{name} {value!r} is not a whole number" for name, value in
               (("PatientNumber", patient), ("SliceNumber", slice_number)) if not value.isdigit()]
        if no_hemorrhage not in ("0", "1"):
            bad.append(f"No_Hemorrhage must be 0 or 1, got {no_hemorrhage!r}")
        if bad:
            problems.append(Problem(f"patient {patient or '?'}", "; ".join(bad), str(csv_path), row))
            continue
        scan = scans.setdefault(mask_key(patient), Scan(mask_key(patient), patient, 0, 0))
        scan.csv_slices += 1
        scan.ich = max(scan.ich, int(no_hemorrhage == "0"))
    return scans


def list_niftis(folder: Path, what: str, problems: list[Problem]) -> dict[str, Path]:
    """NIfTI files of a folder by file number; a folder that is missing, or two files for one number, are problems."""
    if not folder.is_dir():
        problems.append(Problem(str(folder), f"{what} folder not found"))
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and any(path.name.lower().endswith(s) for s in MASK_SUFFIXES):
            key = mask_key(case_id_from_path(path))
            if key in found:
                problems.append(Problem(str(path), f"a second {what} file for number {key} (also {found[key].name})"))
            found.setdefault(key, path)
    return found


def inspect_scan(scan: Scan) -> Scan:
    """Read the scan's image and mask once: HU range, mask values, the mask's grid against the image's (the
    validator's rule, ``data.geometry.align_mask``: written masks carry the image's affine, so a mask that does not
    lie on the image's voxels must be caught here), whether a positive mask lies on blood, volume, label agreement."""
    def problem(path: Path, message: str) -> None:
        scan.problems.append(Problem(str(path), message))

    try:
        image, meta, _ = read_image(scan.image)
    except VolumeLoadError as error:
        problem(scan.image, error.reason)
        image = None
    mask = mask_spacing = mask_affine = None
    if scan.mask is not None:
        try:
            mask, mask_spacing, _, was_255, mask_affine = read_mask(scan.mask)
            if was_255:
                scan.warnings.append(f"{scan.mask}: 0/255 mask, written as 0/1")
        except VolumeLoadError as error:
            problem(scan.mask, error.reason)
    if image is None:
        return scan
    reason = looks_preprocessed(image)
    if reason is not None:
        problem(scan.image, f"{reason}; expected raw HU (the CT-ICH images are stored in HU)")
    if image.shape[-1] != scan.csv_slices:
        scan.warnings.append(f"{scan.image}: {image.shape[-1]} slices along the last axis, but the label CSV lists "
                             f"{scan.csv_slices} for patient {scan.patient_id}")
    if mask is not None:
        alignment = align_mask(meta["affine"], mask_affine, mask.shape, image.shape)
        if alignment.orientation is None or alignment.disagreement is not None:
            problem(scan.mask, f"{alignment.disagreement} (image {scan.image.name}): the mask does not lie on the "
                               "image's voxels; re-save it on the image's grid")
            return scan
        scan.orientation = alignment.orientation
        if not scan.orientation.is_identity:
            scan.warnings.append(f"{scan.mask}: brought into the voxel grid of {scan.image.name} "
                                 f"({scan.orientation.describe()})")
        mask = orient_mask(mask, scan.orientation)
    spacing, _ = resolve_spacing(meta["spacing"], in_image_axes(mask_spacing, scan.orientation.axes),
                                 (1.0, 1.0, 1.0))
    scan.affine = meta["affine"] if meta["affine"] is not None else np.diag([*spacing, 1.0])
    scan.volume_ml = metrics.volume_ml(mask, spacing) if mask is not None else 0.0
    off_blood = label_problem(image, mask) if mask is not None and scan.ich == 1 else None
    if off_blood is not None:
        # A finding, not a refusal: train.py refuses the scan unless --allow_unusual_masks, which may be right.
        scan.warnings.append(f"{scan.mask}: {off_blood} (a train.py flag: its validator refuses the scan without it)")
    if scan.ich == 1 and scan.volume_ml == 0 and mask is not None:
        scan.warnings.append(f"{scan.mask}: patient {scan.patient_id} has hemorrhage slices in the CSV but an "
                             "empty mask (kept as ICH-positive, as the CSV says)")
    elif scan.ich == 0 and scan.volume_ml > 0:
        scan.warnings.append(f"{scan.mask}: patient {scan.patient_id} has no hemorrhage slice in the CSV but the "
                             f"mask marks {scan.volume_ml:.1f} mL (kept as ICH-negative, as the CSV says)")
    return scan


def collect_scans(root: Path) -> list[Scan]:
    """Every scan of the download, read and checked; PrepareError listing every problem."""
    problems: list[Problem] = []
    scans = read_labels(root / LABELS_CSV, problems)
    images = list_niftis(root / IMAGES_DIR, "image", problems)
    masks = list_niftis(root / MASKS_DIR, "mask", problems)
    csv_name = str(root / LABELS_CSV)
    for number in sorted(set(scans) - set(images), key=_numeric):
        problems.append(Problem(csv_name, f"PatientNumber {scans[number].patient_id} has labels but no image "
                                          f"numbered {number} in {IMAGES_DIR}/"))
    if scans or not problems:  # without a readable CSV every image would be reported again
        for number in sorted(set(images) - set(scans), key=_numeric):
            problems.append(Problem(str(images[number]), f"no rows for PatientNumber {number} in {LABELS_CSV}"))
    for number in sorted(set(masks) - set(images), key=_numeric):
        problems.append(Problem(str(masks[number]), f"mask without an image in {IMAGES_DIR}/"))
    present = []
    for number in sorted(set(scans) & set(images), key=_numeric):
        scan = scans[number]
        scan.image, scan.mask = images[number], masks.get(number)
        if scan.mask is None and scan.ich == 1:
            problems.append(Problem(str(scan.image), f"ICH-positive in {LABELS_CSV} but no mask in {MASKS_DIR}/"))
        present.append(scan)
    with ThreadPoolExecutor(max_workers=max(1, min(4, utils.usable_cpu_count()))) as pool:
        present = list(pool.map(inspect_scan, present))
    for scan in present:
        problems += scan.problems
    if problems:
        raise PrepareError(problems)
    for scan in present:
        for warning in scan.warnings:
            logger.warning("%s", warning)
    return present


def _numeric(number: str) -> tuple[int, str]:
    return (int(number), "") if number.isdigit() else (sys.maxsize, number)


def write_cohort(scans: Sequence[Scan], out_dir: Path) -> Path:
    """Write masks/<number>.nii.gz (0/1 uint8, the image's affine) and cohort.csv; returns the CSV's path."""
    mask_dir = out_dir / MASKS_DIR
    mask_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for scan in scans:
        if scan.mask is not None:
            mask = orient_mask(read_mask(scan.mask)[0], scan.orientation)
            nifti = nib.Nifti1Image(np.ascontiguousarray(mask, dtype=np.uint8), scan.affine)
            nifti.header.set_qform(scan.affine, code=1)  # so readers take the spacing from the header
            nifti.header.set_sform(scan.affine, code=1)
            nib.save(nifti, str(mask_dir / f"{case_id_from_path(scan.image)}.nii.gz"))
        rows.append({"path": os.path.abspath(scan.image), "ich": scan.ich, "patient_id": scan.patient_id})
    csv_path = out_dir / "cohort.csv"
    reporting.write_table_csv(csv_path, rows, key_column="path")
    return csv_path


def prepare(root: str | os.PathLike, out_dir: str | os.PathLike, folds: int = 5, test_fraction: float = 0.2,
            seed: int = 0) -> Path:
    """Check, convert and split a CT-ICH download (the CLI's whole job); returns the splits folder.
    PrepareError (nothing written) or SplitError (cohort.csv and masks written, the splits not)."""
    root = Path(os.path.abspath(Path(root).expanduser()))
    out_dir = Path(out_dir)
    if not root.is_dir():
        raise PrepareError([Problem(str(root), "--root is not a folder (the unpacked PhysioNet CT-ICH download)")])
    scans = collect_scans(root)
    csv_path = write_cohort(scans, out_dir)
    positives = sum(s.ich for s in scans)
    logger.info("wrote %s: %d scans (%d ICH-positive, %d ICH-negative) and %d masks in %s", csv_path, len(scans),
                positives, len(scans) - positives, sum(s.mask is not None for s in scans), out_dir / MASKS_DIR)
    volumes = {Path(os.path.abspath(s.image)): s.volume_ml for s in scans}
    split_cohort([csv_path], out_dir / "splits", folds, test_fraction, seed, mask_dir=out_dir / MASKS_DIR,
                 volumes=volumes)
    return out_dir / "splits"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prepare_ctich.py", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True,
                        help=f"The unpacked download: holds {IMAGES_DIR}/, {MASKS_DIR}/ and {LABELS_CSV}.")
    parser.add_argument("--out_dir", required=True, help="Where cohort.csv, masks/ and splits/ are written.")
    parser.add_argument("--folds", type=int, default=5, help="Cross-validation folds (default: 5).")
    parser.add_argument("--test_fraction", type=float, default=0.2,
                        help="Share of patients held out as the test set (default: 0.2).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the split (default: 0).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    utils.setup_logging(None)
    try:
        splits_dir = prepare(args.root, args.out_dir, args.folds, args.test_fraction, args.seed)
    except PrepareError as error:
        logger.error("%s", error)
        return 1
    except SplitError as error:
        logger.error("%s\n(cohort.csv and masks/ were written; split them with splits.py --csv %s --mask_dir %s "
                     "and other --folds / --test_fraction)", error, Path(args.out_dir) / "cohort.csv",
                     Path(args.out_dir) / MASKS_DIR)
        return 1
    logger.info("next: python train.py --folds_dir %s --mask_dir %s --output_dir runs/ctich_cv ...", splits_dir,
                Path(args.out_dir) / MASKS_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
