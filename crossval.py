"""Cross-validation: train the folds splits.py wrote, one after the other, and summarise them.

    python train.py --folds_dir splits --mask_dir masks --output_dir runs/cv ... --fold all   [--resume auto]
    python train.py --folds_dir splits --mask_dir masks --output_dir runs/cv ... --fold 2     (one fold, e.g. per GPU)

Fold k is an ordinary training run (``train.run_training``, passed in so this module does not import its caller)
on ``<folds_dir>/fold_k/{train,val}.csv`` into ``<output_dir>/fold_k/``; the folds share one preprocessing cache
(``<output_dir>/cache``: entries are keyed by content and settings). With ``--resume auto`` a fold whose training
summary shows it finished is not trained again and a fold that was stopped resumes from its ``latest_model.pth``, so
a killed cross-validation continues at the fold where it stopped. After each run ``cv_summary.json``,
``cv_summary.csv`` and ``cv_summary.md`` are rewritten from every finished fold in ``<output_dir>``: per fold the
best epoch's validation metrics, and their mean ± sd over folds.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import report
import reporting
import utils
from config import Config, replace_section
from splits import TRAIN_CSV, VAL_CSV, fold_dir, list_folds

logger = logging.getLogger("ichseg.crossval")

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130
# (key in the trainer's best_metrics, column title): the cross-validation table.
CV_METRICS = (
    ("val_dice", "Dice (ICH+)"),
    ("val_dice_1click", "Dice 1 click"),
    ("val_dice_3click", "Dice 3 clicks"),
    ("val_dice_5click", "Dice 5 clicks"),
    ("val_hd95_mm", "HD95 mm"),
    ("val_volume_abs_error_ml", "abs vol err mL"),
    ("val_negative_fp_ml", "FP mL (ICH-)"),
    ("val_sensitivity", "sensitivity"),
    ("val_specificity", "specificity"),
)
# train.run_training: (config, warnings) -> (exit code, training summary or None)
RunTraining = Callable[..., tuple[int, "dict | None"]]
_SUMMARY_NAME = re.compile(r"training_summary_(\d{8}-\d{6})(?:-(\d+))?\.json")


def fold_config(config: Config, fold: int) -> Config:
    """The run of one fold: its CSVs from ``--folds_dir``, its own output folder, the shared cache."""
    folds_dir, output_dir = Path(config.data.folds_dir), Path(config.train.output_dir)
    config = replace_section(config, "data", train_csv=str(fold_dir(folds_dir, fold) / TRAIN_CSV),
                             val_csv=str(fold_dir(folds_dir, fold) / VAL_CSV),
                             cache_dir=config.data.cache_dir or str(output_dir / "cache"))
    return replace_section(config, "train", output_dir=str(fold_dir(output_dir, fold)), fold=str(fold))


def latest_summary(run_dir: Path) -> dict[str, Any] | None:
    """The newest ``training_summary_*.json`` of a run folder (by its timestamp and same-second suffix), or None."""
    found = []
    for path in run_dir.glob("training_summary_*.json"):
        match = _SUMMARY_NAME.fullmatch(path.name)
        if match:
            found.append((match.group(1), int(match.group(2) or 0), path))
    if not found:
        return None
    path = max(found)[2]
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable training summary ({error}); delete it to retrain the fold") from error


def is_finished(summary: Mapping[str, Any] | None, config: Config) -> bool:
    """Whether a fold's summary shows a run that ended by itself at this run's ``--epochs`` (or early stopping)."""
    if summary is None:
        return False
    return summary.get("stop_reason") == "early_stopping" or (summary.get("epochs_completed") or 0) >= \
        config.train.epochs


def fold_row(fold: int, summary: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the cross-validation table: the fold's best-epoch validation metrics (NaN where absent)."""
    best = summary.get("best_metrics") or {}
    splits = (summary.get("dataset_stats") or {}).get("splits", {})
    row: dict[str, Any] = {"fold": fold, "best_epoch": summary.get("best_epoch"),
                           "epochs": summary.get("epochs_completed"),
                           "train_scans": splits.get("train", {}).get("scans"),
                           "val_scans": splits.get("val", {}).get("scans")}
    for key, _ in CV_METRICS:
        value = best.get(key)
        row[key] = math.nan if value is None else float(value)
    return row


def summarize_folds(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, sd, n}} over folds: NaN-aware, sample sd (ddof 1; NaN with a single fold)."""
    result = {}
    for key, _ in CV_METRICS:
        values = np.array([r[key] for r in rows], dtype=float)
        values = values[np.isfinite(values)]
        result[key] = {"mean": float(values.mean()) if values.size else math.nan,
                       "sd": float(values.std(ddof=1)) if values.size > 1 else math.nan, "n": int(values.size)}
    return result


def format_cv_table(rows: Sequence[Mapping[str, Any]], stats: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table: one line per fold, then mean ± sd."""
    cell = report.format_number
    header = ["fold", "best epoch", *(title for _, title in CV_METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([str(row["fold"]), str(row["best_epoch"]),
                                         *(cell(row[key]) for key, _ in CV_METRICS)]) + " |")
    mean_sd = [f"{cell(stats[key]['mean'])} ± {cell(stats[key]['sd'])}" for key, _ in CV_METRICS]
    lines.append("| " + " | ".join(["mean ± sd", "", *mean_sd]) + " |")
    return "\n".join(lines)


def write_cv_summary(config: Config, folds: Sequence[int]) -> dict[str, Any]:
    """Rewrite cv_summary.{json,csv,md} in ``--output_dir`` from every finished fold; returns the summary."""
    output_dir = Path(config.train.output_dir)
    rows, missing = [], []
    for fold in folds:
        summary = latest_summary(fold_dir(output_dir, fold))
        if is_finished(summary, config):
            rows.append(fold_row(fold, summary))
        else:
            missing.append(fold)
    stats = summarize_folds(rows)
    cv = {"folds_dir": str(Path(config.data.folds_dir).resolve()), "folds": list(folds),
          "finished_folds": [r["fold"] for r in rows], "missing_folds": missing, "complete": not missing,
          "per_fold": rows, "mean_sd": stats,
          "note": "best-epoch validation metrics of each fold (val_dice: mean Dice over ICH-positive scans)"}
    utils.atomic_write_text(output_dir / "cv_summary.json",
                            json.dumps(reporting.to_jsonable(cv), indent=2) + "\n")
    table = [*rows, {"fold": "mean", **{k: stats[k]["mean"] for k, _ in CV_METRICS}},
             {"fold": "sd", **{k: stats[k]["sd"] for k, _ in CV_METRICS}}]
    reporting.write_table_csv(output_dir / "cv_summary.csv", table, key_column="fold")
    markdown = format_cv_table(rows, stats)
    title = f"Cross-validation: {len(rows)} of {len(folds)} folds finished" + (
        f" (missing: {', '.join(map(str, missing))})" if missing else "")
    utils.atomic_write_text(output_dir / "cv_summary.md", f"# {title}\n\n{markdown}\n")
    logger.info("%s; wrote %s\n%s", title, output_dir / "cv_summary.json", markdown)
    return cv


def run_cross_validation(config: Config, config_warnings: Sequence[str], run_training: RunTraining
                         ) -> tuple[int, dict[str, Any] | None]:
    """Train ``--fold`` (a number or all) of ``--folds_dir``; returns (exit code, cross-validation summary).

    Stops at the first fold that fails (1) or is interrupted (130: rerun with ``--resume auto`` to continue)."""
    output_dir = Path(config.train.output_dir)
    # Under torchrun every rank runs the folds together; rank 0 alone logs to files and writes the summary.
    rank = int(os.environ.get("RANK", "0"))
    output_dir.mkdir(parents=True, exist_ok=True)
    utils.setup_logging(output_dir if rank == 0 else None, rank=rank, log_name="cv.log")
    try:
        folds = list_folds(config.data.folds_dir)
    except ValueError as error:
        logger.error("%s", error)
        return EXIT_USAGE, None
    chosen = folds if config.train.fold == "all" else [int(config.train.fold)]
    if chosen[0] not in folds:
        logger.error("--fold %s: %s has folds %s", config.train.fold, config.data.folds_dir,
                     ", ".join(map(str, folds)))
        return EXIT_USAGE, None
    if rank == 0:
        config.save(output_dir / "config.json")
    for fold in chosen:
        run = fold_config(config, fold)
        if config.train.resume == "auto" and is_finished(latest_summary(Path(run.train.output_dir)), config):
            logger.info("fold %d already finished (%s); not trained again", fold, run.train.output_dir)
            continue
        logger.info("cross-validation: fold %d (%d of %d) into %s", fold, chosen.index(fold) + 1, len(chosen),
                    run.train.output_dir)
        code, _ = run_training(run, config_warnings)
        # run_training pointed the log at the fold's train.log; what follows belongs to the whole run.
        utils.setup_logging(output_dir if rank == 0 else None, rank=rank, log_name="cv.log")
        if code != EXIT_OK:
            hint = " (continue with the same command plus --resume auto)" if code == EXIT_INTERRUPTED else ""
            logger.error("fold %d stopped with exit code %d%s", fold, code, hint)
            if rank == 0:
                write_cv_summary(config, folds)
            return code, None
    return EXIT_OK, write_cv_summary(config, folds) if rank == 0 else None
