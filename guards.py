"""Checks a run passes before any work: folders it can write, no finished run overwritten by accident, and a
``--resume`` checkpoint that was trained with the settings of this run.

Each refusal is a ``RunGuardError``: one line naming the path or the settings and the fix, which the CLIs log and
turn into exit code 2 (bad arguments). Nothing here builds a model or reads the cohort, so a run that cannot work
ends in a second instead of after validation or an epoch.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from config import Config, ConfigError
from data.preprocess import PIPELINE_VERSION
from model import read_trained_checkpoint
from modeling.export import EXPORT_KEYS

logger = logging.getLogger(__name__)

# What a training run leaves in its --output_dir that a second run would replace: its checkpoints, metrics and
# summaries. config.json and train.log alone are not a run (a run that failed validation writes them), so a rerun
# after fixing the data is not refused. The names are trainer.py's (not imported: the trainer imports this module).
LATEST_NAME = "latest_model.pth"
RUN_FILES = (LATEST_NAME, "best_model.pth", "sam_encoder.pth", "metrics.csv", "learning_curves.png")
RUN_PATTERNS = ("checkpoint_epoch_*.pth", "training_summary_*.json")
# What a checkpoint needs to be resumed from (latest_model.pth, best_model.pth and epoch snapshots have all).
RESUME_KEYS = ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "epoch", "config")


class RunGuardError(ValueError):
    """The run cannot start as asked; the message is one line naming the path or settings and the fix."""


class ResumeMismatchError(RunGuardError):
    """The ``--resume`` checkpoint is not a training checkpoint or was trained with other settings."""


# ------------------------------------------------------------------------------------------------------- folders

def usable_folder(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` if needed and prove a file can be written in it; RunGuardError naming ``flag``, the path and
    the fix when it is a file, lies under a file, cannot be created or is read-only."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise RunGuardError(f"{flag} {folder} is a file, not a folder: pass a folder path (it is created if missing)")
    for parent in folder.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunGuardError(f"{flag} {folder} cannot be created: {parent} is a file; pass a folder path "
                                    "that is not under a file")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunGuardError(f"{flag} {folder} cannot be created ({error.strerror or error}): choose a folder you "
                            "can write to") from None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise RunGuardError(f"{flag} {folder} is not writable ({error.strerror or error}): choose a folder you can "
                            "write to, or fix its permissions") from None
    return folder


def existing_run_files(output_dir: str | os.PathLike) -> list[str]:
    """Names of the files of a training run already in ``output_dir`` (``RUN_FILES``, ``RUN_PATTERNS``)."""
    folder = Path(output_dir).expanduser()
    if not folder.is_dir():
        return []
    found = [name for name in RUN_FILES if (folder / name).is_file()]
    for pattern in RUN_PATTERNS:
        found += sorted(p.name for p in folder.glob(pattern) if p.is_file())
    return found


def clear_previous_run(output_dir: str | os.PathLike) -> list[str]:
    """``--overwrite``: delete the previous run's files, so no old best_model.pth or epoch snapshot is left next to
    the new run's; returns their names."""
    removed = existing_run_files(output_dir)
    for name in removed:
        (Path(output_dir).expanduser() / name).unlink(missing_ok=True)
    return removed


def check_training_run(config: Config) -> None:
    """Everything train.py checks before any work or write, in order: an --output_dir holding a run needs
    ``--resume`` or ``--overwrite``; --output_dir and --cache_dir must be usable folders; a ``--resume``
    checkpoint must fit this run (``check_resume_file``). RunGuardError (exit 2); CheckpointError for an
    unreadable checkpoint (exit 1)."""
    t = config.train
    output_dir = Path(t.output_dir).expanduser()
    if t.resume is None and not t.overwrite:
        found = existing_run_files(output_dir)
        if found:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise RunGuardError(f"--output_dir {output_dir} already holds a training run ({shown}): continue it with "
                                "--resume auto, replace it with --overwrite, or choose another --output_dir")
    check_folders(config)
    check_resume_file(config)


def check_folders(config: Config) -> None:
    """--output_dir and --cache_dir (default ``<output_dir>/cache``) must be usable folders (``usable_folder``);
    also what cross-validation checks before its folds (each fold's run then passes ``check_training_run``)."""
    output_dir = Path(config.train.output_dir).expanduser()
    usable_folder(output_dir, "--output_dir")
    usable_folder(config.data.cache_dir if config.data.cache_dir is not None else output_dir / "cache",
                  "--cache_dir")


# -------------------------------------------------------------------------------------------------------- resume

def resume_path(config: Config) -> Path | None:
    """The checkpoint ``--resume`` names, or None (no --resume, or ``auto`` before any checkpoint exists)."""
    resume = config.train.resume
    if resume is None:
        return None
    path = Path(config.train.output_dir).expanduser() / LATEST_NAME if resume == "auto" else Path(resume)
    return path if path.is_file() else None


def check_resume_file(config: Config) -> None:
    """Read the ``--resume`` checkpoint (if any) and refuse it when it cannot continue this run
    (``check_resume_state``). CheckpointError naming the file when it is unreadable or unsafe."""
    path = resume_path(config)
    if path is None:
        return
    check_resume_state(read_trained_checkpoint(path, required=()), config, path)


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def _numbers(values: Sequence[float]) -> str:
    return " ".join(f"{float(v):g}" for v in values)


def resume_differences(state: Mapping[str, Any], config: Config) -> list[str]:
    """The settings a checkpoint was trained with that this run changes, one ``--flag old (this run: new)`` each:
    preprocessing (``--hu_window``, ``--normalization``, ``--target_spacing``, pipeline version: earlier epochs saw
    other volumes), the architecture (``--model``, ``--visual_tokens``, ``--mask_refiner``) and the trainable set
    (``--freeze_encoder``: the optimizer's state belongs to other parameters)."""
    try:
        saved = Config.from_dict(state["config"])
    except (ConfigError, TypeError, ValueError, AttributeError) as error:
        return [f"its saved config cannot be read ({str(error).splitlines()[0]})"]
    preprocessing = state.get("preprocessing") or {
        "hu_window": saved.data.hu_window, "normalization": saved.data.normalization,
        "target_spacing": saved.data.target_spacing, "pipeline_version": 1}
    d, m = config.data, config.model
    pairs = [
        ("--model", saved.model.name, m.name),
        ("--visual_tokens", saved.model.visual_tokens, m.visual_tokens),
        ("--mask_refiner", _on_off(saved.model.mask_refiner), _on_off(m.mask_refiner)),
        ("--freeze_encoder", _on_off(saved.model.freeze_encoder), _on_off(m.freeze_encoder)),
        ("--normalization", preprocessing["normalization"], d.normalization),
        ("--target_spacing", _numbers(preprocessing["target_spacing"]), _numbers(d.target_spacing)),
        ("preprocessing pipeline version", int(preprocessing.get("pipeline_version", 1)), PIPELINE_VERSION),
    ]
    # sam_med3d clamps to its own window: --hu_window does not change its volumes.
    if not preprocessing["normalization"] == d.normalization == "sam_med3d":
        pairs.append(("--hu_window", _numbers(preprocessing["hu_window"]), _numbers(d.hu_window)))
    return [f"{flag} {old} (this run: {new})" for flag, old, new in pairs if old != new]


def check_resume_state(state: Any, config: Config, path: Path) -> None:
    """ResumeMismatchError when ``state`` (a checkpoint's content) is not a training checkpoint, or was trained with
    settings this run changes (``resume_differences``, all named in one line)."""
    if isinstance(state, dict) and all(key in state for key in EXPORT_KEYS[:2]):
        raise ResumeMismatchError(f"--resume {path} is the encoder export for BLIP-2 (sam_encoder.pth), not a "
                                  "training checkpoint: resume from latest_model.pth in the run's --output_dir")
    missing = [key for key in RESUME_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ResumeMismatchError(f"--resume {path} is not a training checkpoint written by train.py (it lacks "
                                  f"{', '.join(missing)}): resume from latest_model.pth in the run's --output_dir")
    differences = resume_differences(state, config)
    if differences:
        raise ResumeMismatchError(f"--resume {path} was trained with other settings: {'; '.join(differences)}. "
                                  "Resume with the checkpoint's settings, or start a new run (another --output_dir "
                                  "or --overwrite)")


def _groups(param_groups: Sequence[Mapping[str, Any]]) -> list[tuple[str, int]]:
    return [(str(group.get("name", f"group {i}")), len(group["params"])) for i, group in enumerate(param_groups)]


def check_parameter_groups(saved_optimizer_state: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                           path: Path) -> None:
    """ResumeMismatchError unless the checkpoint's optimizer has the same parameter groups (names and tensor
    counts) as this run's: loading it otherwise fails deep inside torch, or pairs moments with the wrong tensors."""
    saved, current = _groups(saved_optimizer_state.get("param_groups", [])), _groups(optimizer.param_groups)
    if saved != current:
        def text(groups: list[tuple[str, int]]) -> str:
            return ", ".join(f"{name} {count} tensors" for name, count in groups) or "none"
        raise ResumeMismatchError(f"--resume {path}: the optimizer's parameter groups differ (checkpoint: "
                                  f"{text(saved)}; this run: {text(current)}): resume with the checkpoint's "
                                  "--freeze_encoder/--mask_refiner, or start a new run")

