"""Segment hemorrhage on new scans with a fine-tuned checkpoint, and evaluate against masks when given.

    python predict.py --checkpoint outputs/best_model.pth --input scans/ --output_dir preds
    python predict.py --checkpoint outputs/best_model.pth --input val.csv --mask_dir masks --output_dir eval
    python predict.py --checkpoint outputs/best_model.pth --input 049.pkl --points "250,260,14;240,300,15,0" \
        --output_dir preds
    python predict.py --checkpoint runs/cv --input splits/test.csv --mask_dir masks --output_dir test_report

Preprocessing is read from the checkpoint (the exact training pipeline), and scans, masks, CSVs and spacing are read
by the same functions training uses (``data.io``, ``data.cohort``), so predict accepts exactly the files training
accepts. Each scan gets a mask in its original grid (``049.pkl`` → ``049.nii.gz``), a row in ``predictions.csv``
and, on request, a probability map and a PNG overlay. Clicks (``--points``, positive and negative, applied in order)
refine the prompt-free answer SAM-style (``inference.apply_clicks``); that answer is averaged over the scan and
its mirror images (``--tta mirror``, the default; ``inference.mirrored_logits``). With ``--mask_dir`` the run also
writes ``metrics.csv`` (prompt-free, and after 1, 3 and 5 simulated clicks on the largest remaining error) and
``volume_agreement.png``, and ``report.md`` (cohort means with 95% bootstrap confidence intervals, volume agreement,
per-scan metrics; ``report.py``). Several checkpoints (or a cross-validation folder: ``ensemble.py``) form an
ensemble whose probabilities are averaged; user clicks then refine each member's answer before averaging, and the
simulated-click metrics are left out (each member would be clicked on its own errors, which no user does).
A bad file is reported and skipped; the exit code is 1 when any scan failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import guards
import metrics
import report
import reporting
import utils
from config import Config, component_filter_problems
from data.cohort import read_scan_csv
from data.geometry import label_findings, load_mask_for_image
from data.io import (IMAGE_SUFFIXES, MaskIndex, VolumeLoadError, case_id_from_path, in_image_axes, is_image_file,
                     load_image_file, looks_preprocessed, matching_axes, read_mask_header, resolve_spacing)
from data.preprocess import Preprocessing, preprocess_image, resample_to_shape
from data.records import Problem
from ensemble import resolve_checkpoints, shared_preprocessing
from inference import (MIRROR_AXES, SIMULATED_CLICKS, Click, apply_clicks, choose_amp_dtype, drop_components,
                       mirrored_logits, simulated_click_logits)
from model import CheckpointError, model_from_trained, read_trained_checkpoint

logger = logging.getLogger("ichseg.predict")


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    checkpoint: list[str]
    input: str
    output_dir: str
    mask_dir: str | None
    spacing: list[float] | None
    points: str | None
    threshold: float
    detection_threshold_ml: float
    min_component_ml: float | None
    save_probabilities: bool
    save_png: bool
    device: str
    use_mixed_precision: bool
    tta: str = "mirror"
    simulate_clicks: list[int] = dataclasses.field(default_factory=lambda: list(SIMULATED_CLICKS))
    min_component_peak: float | None = None


@dataclasses.dataclass(frozen=True)
class ScanInput:
    """One scan to segment: its image path and, from a CSV, its row's ICH label."""

    path: Path
    ich: int | None = None


class PredictionError(RuntimeError):
    """A scan could not be segmented; the message names the file."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="best_model.pth or latest_model.pth from train.py, a run folder (its best_model.pth) or "
                             "a cross-validation folder (every fold_<k>/best_model.pth); several make an ensemble "
                             "that averages probabilities.")
    parser.add_argument("--input", required=True,
                        help=f"A volume ({', '.join(IMAGE_SUFFIXES)}), a folder of them, or a CSV in the "
                             "training format (path,ich,patient_id; only path is required).")
    parser.add_argument("--output_dir", default="./predictions", help="Where masks and tables are written.")
    parser.add_argument("--mask_dir", default=None,
                        help="Ground-truth masks (training naming rule): enables evaluation (metrics.csv).")
    parser.add_argument("--points", default=None,
                        help="Clicks for a single input, in original voxel coordinates of array axes 0,1,2, applied "
                             "in order: 'x,y,z;x,y,z,0' (a fourth value 0 marks a background click, 1 or nothing "
                             "hemorrhage). Each click refines the current answer around it; other foci are kept.")
    parser.add_argument("--simulate_clicks", type=int, nargs="*", default=list(SIMULATED_CLICKS), metavar="K",
                        help="With --mask_dir: also report Dice after K simulated clicks, each on the largest "
                             "remaining error (default: 1 3 5; give no value to skip).")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar="MM",
                        help="Voxel spacing (mm, array axis order) for scans whose file carries none and that have "
                             "no mask header to read it from (default: the training run's --spacing).")
    parser.add_argument("--threshold", type=float, default=0.5, help="Probability threshold for the mask.")
    parser.add_argument("--detection_threshold_ml", type=float, default=None,
                        help="Volume above which a scan counts as ICH-positive (default: metrics module's 0.1 mL).")
    parser.add_argument("--min_component_ml", type=float, default=None, metavar="ML",
                        help="Drop prompt-free components smaller than this (mL; 0 keeps all). Default: the value "
                             "the checkpoint was trained and validated with (0.3 mL; 0 for older checkpoints).")
    parser.add_argument("--min_component_peak", type=float, default=None, metavar="P",
                        help="Also drop prompt-free components whose most confident voxel is under this probability "
                             "(0.5 keeps all). Default: the value the checkpoint was trained and validated with.")
    parser.add_argument("--save_probabilities", action="store_true", help="Also write <stem>_prob.nii.gz.")
    parser.add_argument("--save_png", action="store_true", help="Also write <stem>.png: slices with most blood.")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="Compute device.")
    parser.add_argument("--use_mixed_precision", action="store_true", help="bf16/fp16 autocast for inference.")
    parser.add_argument("--tta", default="mirror", choices=("mirror", "none"),
                        help="Test-time augmentation of the prompt-free answer: mirror (default) averages the scan "
                             "and its mirror image along each axis (4 passes); none is 4x faster.")
    return parser


def parse_points(text: str | None) -> list[Click]:
    """'x,y,z;x,y,z,0' → clicks in original voxel coordinates (positive unless a fourth value 0 marks background)."""
    if not text:
        return []
    clicks = []
    for chunk in filter(None, (c.strip() for c in text.split(";"))):
        values = [v.strip() for v in chunk.split(",")]
        if len(values) not in (3, 4):
            raise ValueError(f"--points: '{chunk}' should be 'x,y,z' or 'x,y,z,label'")
        try:
            coords = tuple(float(v) for v in values[:3])
            label = int(values[3]) if len(values) == 4 else 1
        except ValueError as error:
            raise ValueError(f"--points: '{chunk}' is not numeric") from error
        if any(c < 0 for c in coords):
            raise ValueError(f"--points: '{chunk}' has a negative coordinate; clicks are voxel indices 0..n-1 "
                             "along array axes 0, 1, 2")
        if label not in (0, 1):
            raise ValueError(f"--points: label in '{chunk}' must be 0 or 1")
        clicks.append(Click(point=coords, positive=bool(label)))  # type: ignore[arg-type]
    return clicks


def collect_inputs(input_path: Path) -> list[ScanInput]:
    """A file, a folder of image files, or a CSV read like the training CSVs (``read_scan_csv``: ``path`` column,
    optional ``ich``; relative paths from the CSV's folder). Accepts exactly the file kinds training accepts."""
    if not input_path.exists():
        raise FileNotFoundError(f"--input {input_path}: no such file or folder")
    if input_path.is_dir():
        files = sorted(p for p in input_path.iterdir() if p.is_file() and is_image_file(p))
        if not files:
            raise ValueError(f"--input {input_path}: no {', '.join(IMAGE_SUFFIXES)} files in this folder")
        return [ScanInput(p) for p in files]
    if input_path.suffix.lower() == ".csv":
        problems: list[Problem] = []
        rows = read_scan_csv(input_path, "input", problems, required=("path",))
        if problems:
            raise ValueError(f"--input {input_path}:\n" + "\n".join(f"  - {p}" for p in problems))
        return [ScanInput(row.image_path, row.ich) for row in rows]
    if not is_image_file(input_path):
        raise ValueError(f"--input {input_path}: expected one of {', '.join(IMAGE_SUFFIXES)}, a folder or a CSV")
    return [ScanInput(input_path)]


class Predictor:
    """A checkpoint, or several (an ensemble), loaded once; ``segment`` maps one raw volume to a probability map in
    its original grid. The members share one preprocessing (``ensemble.shared_preprocessing``); ``config`` is the
    first member's."""

    def __init__(self, checkpoints: Path | Sequence[Path], device: torch.device, use_mixed_precision: bool = False,
                 min_component_ml: float | None = None, mirror_axes: Sequence[int] = MIRROR_AXES,
                 min_component_peak: float | None = None):
        self.checkpoints = [Path(checkpoints)] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
        self.models, configs, preprocessings = [], [], []
        for checkpoint in self.checkpoints:
            try:
                state = read_trained_checkpoint(checkpoint)
                model, config = model_from_trained(state, checkpoint, device)
            except CheckpointError as error:  # names the file; nothing in it was executed
                raise PredictionError(f"--checkpoint {error}") from error
            self.models.append(model)
            configs.append(config)
            preprocessings.append(trained_preprocessing(state, config, int(model.img_size)))
        self.model, self.config = self.models[0], configs[0]
        self.device = device
        self.amp_dtype = choose_amp_dtype(device, use_mixed_precision)
        self.preprocessing = shared_preprocessing(self.checkpoints, preprocessings)
        self.roi_size = int(self.model.img_size)
        # An ensemble drops what its first member was validated with, unless the caller chooses.
        self.min_component_ml = (self.config.model.min_component_ml if min_component_ml is None
                                 else float(min_component_ml))
        self.min_component_peak = (self.config.model.min_component_peak if min_component_peak is None
                                   else float(min_component_peak))
        self.mirror_axes = tuple(mirror_axes)

    def prepare(self, image: np.ndarray, spacing: Sequence[float]) -> torch.Tensor:
        """Raw HU volume -> the model's input grid: 1×1×D'×H'×W' on the device (the checkpoint's preprocessing)."""
        prepared = preprocess_image(image, spacing, self.preprocessing)
        return torch.as_tensor(prepared, dtype=torch.float32)[None].to(self.device)

    def segment(self, image: np.ndarray, spacing: Sequence[float], clicks: Sequence[Click] = (),
                truth: np.ndarray | None = None, simulate: Sequence[int] = ()) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Segment a raw HU volume with voxel ``spacing``: prompt-free, then refined by ``clicks`` (voxel coordinates
        of ``image``, array axes 0, 1, 2) in order. Returns the probability map (float32, the shape of ``image``;
        an ensemble's is the members' mean, each refined by the clicks first) and, for a single model with
        ``truth`` (D×H×W, the scan's mask) and ``simulate``, {k: probability map after k simulated clicks} starting
        from the prompt-free answer (``inference.simulated_click_logits``; the clicks are placed against ``truth``
        resampled to the model's grid, as in training validation)."""
        for click in clicks:
            if any(not 0 <= c <= n - 1 for c, n in zip(click.point, image.shape)):
                raise ValueError(f"click {tuple(click.point)} lies outside the volume of shape {image.shape}")
        volume = self.prepare(image, spacing)
        moved = [Click(to_model_grid(c.point, image.shape, volume.shape[2:]), c.positive) for c in clicks]
        probabilities = torch.zeros_like(volume)
        for model in self.models:
            free = drop_components(
                mirrored_logits(model, volume, self.roi_size, self.amp_dtype, self.mirror_axes),
                self.preprocessing.target_spacing, self.min_component_ml, self.min_component_peak)
            logits = apply_clicks(model, volume, free, moved, self.roi_size, self.amp_dtype) if moved else free
            probabilities += torch.sigmoid(logits) / len(self.models)
        simulated: dict[int, np.ndarray] = {}
        if truth is not None and simulate and len(self.models) == 1:  # ``free``: the single model's answer
            label = resample_to_shape(np.asarray(truth, dtype=np.uint8)[None], volume.shape[2:], "nearest")
            clicked = simulated_click_logits(self.model, volume, torch.as_tensor(label)[None].to(self.device), free,
                                             self.roi_size, self.amp_dtype, simulate)
            simulated = {k: self.to_original_grid(torch.sigmoid(v), image.shape) for k, v in clicked.items()}
        return self.to_original_grid(probabilities, image.shape), simulated

    @staticmethod
    def to_original_grid(probabilities: torch.Tensor, shape: Sequence[int]) -> np.ndarray:
        """1×1×D'×H'×W' probabilities resampled back onto the scan's own D×H×W grid (float32). (Trilinear
        resampling is linear, so averaging members before or after it gives the same map.)"""
        restored = resample_to_shape(probabilities[0].cpu().numpy(), shape, mode="trilinear")
        return np.asarray(restored, dtype=np.float32).reshape(tuple(shape))


def to_model_grid(point: Sequence[float], shape: Sequence[int], model_shape: Sequence[int]
                  ) -> tuple[float, float, float]:
    """A voxel coordinate of the original grid in the preprocessed grid: voxel centres follow resample_to_shape's
    align_corners=False convention (the grid spans the same physical extent), clipped inside the volume."""
    scale = np.asarray(model_shape, dtype=float) / np.asarray(shape, dtype=float)
    moved = np.clip((np.asarray(point, dtype=float) + 0.5) * scale - 0.5, 0, np.asarray(model_shape, dtype=float) - 1)
    return tuple(float(c) for c in moved)  # type: ignore[return-value]


def largest_component_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume (mL) of the largest 6-connected blob of ``mask`` (scipy labels it, as
    ``inference.drop_components`` does and says why)."""
    components, count = ndimage.label(mask > 0)
    if count == 0:
        return 0.0
    sizes = np.bincount(components.ravel())[1:]
    return float(sizes.max()) * float(np.prod(spacing)) / 1000.0


def trained_preprocessing(state: dict[str, Any], config: Config, input_size: int) -> Preprocessing:
    """The preprocessing a checkpoint's model was trained with: its ``preprocessing`` entry; checkpoints written
    before that entry existed (pipeline version 1) carry it only inside their config."""
    if "preprocessing" in state:
        return Preprocessing.from_dict(state["preprocessing"])
    return Preprocessing.from_config(config.data, input_size, pipeline_version=1)


def scan_geometry(path: Path, meta: dict[str, Any], shape: Sequence[int], mask_path: Path | None,
                  fallback_spacing: Sequence[float]) -> tuple[tuple[float, float, float], np.ndarray]:
    """Voxel spacing and affine of a raw scan. Spacing follows training's rule (``resolve_spacing``): the file's
    own, else its mask's NIfTI header (reordered when the mask is stored with permuted axes), else
    ``fallback_spacing`` (``--spacing``, by default the training run's). The affine is the file's, else the mask
    header's when the mask has the image's axis order, else diagonal."""
    header = read_mask_header(mask_path) if meta.get("spacing") is None and mask_path is not None else None
    axes = matching_axes(shape, header.shape) if header is not None else None
    spacing, source = resolve_spacing(meta.get("spacing"), in_image_axes(header.spacing if header else None, axes),
                                      fallback_spacing)
    if source == "fallback":
        logger.warning("%s: no spacing in the file or a mask header; using the fallback spacing %s mm "
                       "(--spacing)", path, spacing)
    affine = meta.get("affine")
    if affine is None and source == "mask_header" and axes == (0, 1, 2):
        affine = header.affine
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    return spacing, np.asarray(affine, dtype=float)


def run(config: PredictConfig) -> int:
    """Segment (and evaluate) every input scan; returns the exit code (1 when any scan failed)."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clicks = parse_points(config.points)
    scans = collect_inputs(Path(config.input))
    if clicks and len(scans) != 1:
        raise ValueError(f"--points applies to a single input scan, got {len(scans)} scans")
    masks = MaskIndex(config.mask_dir) if config.mask_dir else None
    device = utils.resolve_device(config.device)
    predictor = Predictor(resolve_checkpoints(config.checkpoint), device, config.use_mixed_precision,
                          config.min_component_ml, MIRROR_AXES if config.tta == "mirror" else (),
                          min_component_peak=config.min_component_peak)
    threshold_ml = (config.detection_threshold_ml if config.detection_threshold_ml is not None
                    else metrics.DEFAULT_DETECTION_THRESHOLD_ML)
    if len(predictor.models) > 1 and config.simulate_clicks and masks is not None:
        logger.info("ensemble of %d models: simulated-click metrics are left out (each member would be clicked on "
                    "its own errors); evaluate a single checkpoint for them", len(predictor.models))
        config = dataclasses.replace(config, simulate_clicks=[])
    logger.info("segmenting %d scan(s) with %s (%s) on %s, test-time mirroring %s", len(scans),
                ", ".join(map(str, predictor.checkpoints)), predictor.config.model.name, device,
                f"on ({1 + len(predictor.mirror_axes)} passes)" if predictor.mirror_axes else "off")

    prediction_rows: list[dict[str, Any]] = []
    metric_rows: list[dict[str, Any]] = []
    failures: list[str] = []
    with logging_redirect_tqdm():  # log lines go through tqdm.write, so the progress bar stays intact
        for scan in tqdm(scans, desc="scans", unit="scan"):
            row = _predict_scan(scan, config, predictor, masks, clicks, threshold_ml, failures)
            if row is not None:
                prediction, evaluation = row
                prediction_rows.append(prediction)
                if evaluation is not None:
                    metric_rows.append(evaluation)

    reporting.write_table_csv(output_dir / "predictions.csv", prediction_rows, key_column="file")
    if metric_rows:
        reporting.write_table_csv(output_dir / "metrics.csv", metric_rows, key_column="file")
        summary = report.cohort_summary(metric_rows, threshold_ml, config.simulate_clicks)
        logger.info("evaluation over %d scans\n%s", len(metric_rows), format_summary(summary))
        reporting.plot_volume_agreement(metric_rows, output_dir / "volume_agreement.png")
        report.write_report(output_dir, metric_rows, checkpoints=predictor.checkpoints, input_path=config.input,
                            mask_dir=config.mask_dir, detection_threshold_ml=threshold_ml,
                            threshold=config.threshold, simulated_clicks=config.simulate_clicks)
    logger.info("wrote %d prediction(s) to %s", len(prediction_rows), output_dir)
    if failures:
        logger.error("%d scan(s) failed:\n  %s", len(failures), "\n  ".join(failures))
        return 1
    return 0


def _predict_scan(scan: ScanInput, config: PredictConfig, predictor: Predictor, masks: MaskIndex | None,
                  clicks: Sequence[Click], threshold_ml: float, failures: list[str]) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """Segment one scan and write its files; returns its predictions.csv row and, with ``--mask_dir``, its
    metrics.csv row (None when not evaluated). A scan that cannot be read or segmented is logged, added to
    ``failures`` and skipped (None)."""
    output_dir = Path(config.output_dir)
    started = time.time()
    try:
        image, meta = load_image_file(scan.path)
        not_raw = looks_preprocessed(image)
        if not_raw is not None:  # training warns for the same file: a model fed other units answers nonsense
            logger.warning("%s: %s; expected raw HU, so this prediction is unreliable", scan.path, not_raw)
        mask_path = masks.find(scan.path) if masks is not None else None
        spacing, affine = scan_geometry(scan.path, meta, image.shape, mask_path,
                                        config.spacing or predictor.config.data.spacing)
        truth = None
        if mask_path is not None:
            # The same alignment training validates with: reoriented by the affines, refused when they disagree.
            truth, orientation = load_mask_for_image(mask_path, image.shape, meta.get("affine"))
            if not orientation.is_identity:
                logger.warning("%s: mask %s brought into the image's grid (%s)", scan.path, mask_path.name,
                               orientation.describe())
            off_blood = label_findings(image, truth) if not_raw is None else None  # HU rules need raw HU
            if off_blood is not None:  # training's validator refuses such a mask; here its metrics are suspect
                logger.warning("%s: %s (mask %s: another scan or orientation?), so its metrics are unreliable",
                               scan.path, off_blood, mask_path.name)
        elif config.mask_dir and scan.ich == 1:
            logger.warning("%s: ICH-positive in the CSV but no mask in %s; not evaluated", scan.path,
                           config.mask_dir)
        elif config.mask_dir:
            truth = np.zeros(image.shape, dtype=np.uint8)  # ICH-negative scans have no mask file: empty truth
        probabilities, clicked = predictor.segment(image, spacing, clicks, truth, config.simulate_clicks)
    except (OSError, ValueError, RuntimeError) as error:
        reason = _reason(error, scan.path)
        failures.append(f"{scan.path}: {reason}")
        logger.error("%s: skipped: %s", scan.path, reason)
        return None
    mask = (probabilities >= config.threshold).astype(np.uint8)
    stem = case_id_from_path(scan.path)
    nib.save(nib.Nifti1Image(mask, affine), str(output_dir / f"{stem}.nii.gz"))
    if config.save_probabilities:
        nib.save(nib.Nifti1Image(probabilities.astype(np.float32), affine), str(output_dir / f"{stem}_prob.nii.gz"))
    volume = metrics.volume_ml(mask, spacing)
    evaluation = None
    if truth is not None:
        evaluation = {"file": scan.path.name, **metrics.segmentation_metrics(mask, truth, spacing)}
        for k, clicked_probabilities in clicked.items():
            evaluation[f"dice_{k}click"] = metrics.dice(clicked_probabilities >= config.threshold, truth)
    if config.save_png:
        reporting.save_overlay_png(image, truth if truth is not None else np.zeros_like(mask), mask,
                                   output_dir / f"{stem}.png", f"{scan.path.name}: {volume:.1f} mL")
    prediction = {"file": scan.path.name, "ich_predicted": "yes" if volume > threshold_ml else "no",
                  "volume_ml": round(volume, 3),
                  "largest_component_ml": round(largest_component_ml(mask, spacing), 3),
                  "runtime_s": round(time.time() - started, 3)}
    return prediction, evaluation


def _reason(error: BaseException, path: Path) -> str:
    """The error's message without the scan's path in front (the caller names the scan once)."""
    if isinstance(error, VolumeLoadError) and Path(error.path) == path:
        return error.reason
    text = str(error)
    return text[len(f"{path}: "):] if text.startswith(f"{path}: ") else text


def _points_value_attached(argv: Sequence[str]) -> list[str]:
    """``--points -5,3,2`` as ``--points=-5,3,2``: argparse takes a value starting with '-' for an option and
    would refuse it before parse_points could say what is wrong with it."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        if argv[index] == "--points" and index + 1 < len(argv):
            joined.append(f"--points={argv[index + 1]}")
            index += 2
        else:
            joined.append(argv[index])
            index += 1
    return joined


def format_summary(summary: dict[str, float]) -> str:
    labels = {"dice": "Dice (all scans)", "dice_positive": "Dice (ICH-positive scans)",
              **{key: f"  after {key.split('_')[-1][:-5]} simulated click(s)" for key in summary
                 if key.startswith("dice_positive_")},
              "hd95_mm": "HD95 (mm)", "volume_abs_error_ml": "|volume error| (mL)",
              "negative_fp_ml": "false-positive mL (negatives)", "sensitivity": "detection sensitivity",
              "specificity": "detection specificity"}
    return "\n".join(f"  {text:<34} {summary[key]:.4f}" for key, text in labels.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_points_value_attached(sys.argv[1:] if argv is None else argv))
    for problem in component_filter_problems(args.min_component_ml, args.min_component_peak):
        parser.error(problem)
    config = PredictConfig(**vars(args))
    try:
        guards.usable_folder(config.output_dir, "--output_dir")  # before the log file is opened in it
    except guards.RunGuardError as error:
        utils.setup_logging(None)
        logger.error("%s", error)
        return 2
    utils.setup_logging(Path(config.output_dir), rank=0, log_name="predict.log")
    try:
        return run(config)
    except (FileNotFoundError, ValueError, PredictionError) as error:
        logger.error("%s", error)
        return 2 if isinstance(error, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
