"""``python train.py --test``: the whole product exercised on a generated synthetic head-CT cohort.

It trains the tiny model with the real pipeline in a temporary folder, then checks every output file, the
BLIP-2 encoder export (rebuilt from ``sam_encoder.pth`` alone it must give bit-identical tokens, and the tokens must
feed a real Q-Former when ``transformers`` is installed, SKIP otherwise) and resuming, and prints a PASS/FAIL/SKIP
report. Given data flags (``--train_csv``/``--val_csv``/``--mask_dir``), ``--test`` checks the user's own run
instead (``usercheck.py``).
"""
from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import blip2
from checks import Check, all_passed, format_report
from config import Config, build_config
from synthetic import generate_cohort
from usercheck import has_data_flags, run_user_check

logger = logging.getLogger(__name__)

# The self-test cohort and schedule: small enough for < 3 minutes on 2 CPU cores, large enough to learn.
SELFTEST_COHORT = {"n_train": 16, "n_val": 6, "shape": (96, 96, 24), "spacing": (1.2, 1.2, 4.0), "seed": 7}
SELFTEST_EPOCHS = 20
# Validation every few epochs: with Dice after 1, 3 and 5 simulated clicks it costs more than a training epoch.
SELFTEST_VAL_EVERY = 10
# Validation Dice on ICH-positive scans the tiny model must reach.
SELFTEST_MIN_DICE = 0.25
CLICK_TOLERANCE = 0.02
EXPECTED_FILES = ("best_model.pth", "latest_model.pth", "sam_encoder.pth", "config.json", "metrics.csv",
                  "learning_curves.png", "train.log", "dataset_stats.json")


# What the self-test runs: train.run_training, passed in by train.py (so this module does not import its caller).
RunTraining = Callable[..., tuple[int, dict | None]]


def selftest_argv(cohort: Any, output_dir: Path, base: Config, epochs: int | None = None,
                  val_every: int = SELFTEST_VAL_EVERY) -> list[str]:
    """Command-line flags for the self-test run (the user's --device and --use_wandb are kept)."""
    epochs = SELFTEST_EPOCHS if epochs is None else epochs
    argv = ["--train_csv", str(cohort.train_csv), "--val_csv", str(cohort.val_csv), "--mask_dir",
            str(cohort.mask_dir), "--output_dir", str(output_dir), "--model", "tiny", "--epochs", str(epochs),
            "--batch_size", "2", "--gradient_accumulation_steps", "1", "--lr", "2e-3", "--weight_decay", "1e-4",
            "--scheduler_type", "cosine", "--warmup_epochs", "1", "--patience", str(epochs),
            "--target_spacing", "2.0", "2.0", "2.0", "--num_workers", "0", "--seed", "0",
            "--device", base.train.device, "--prompt_mode", "mixed", "--click_rounds", "2", "--val_every",
            str(val_every)]
    if base.log.use_wandb:
        argv.append("--use_wandb")
    return argv


def _run_check(checks: list[Check], name: str, fn: Callable[[], str]) -> None:
    try:
        checks.append(Check(name, True, fn()))
    except (AssertionError, OSError, RuntimeError, ValueError, KeyError) as error:
        checks.append(Check(name, False, f"{type(error).__name__}: {error}"))


def run_self_test(base: Config, run_training: RunTraining) -> int:
    """Generate a cohort, train with ``run_training(config, warnings) -> (exit code, summary)``, verify; prints
    the report and returns the exit code (0 PASS, 1 FAIL). With data flags in ``base``: the check of the user's
    own run instead (``usercheck.run_user_check``)."""
    if has_data_flags(base):
        return run_user_check(base)
    started = time.time()
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="ichseg-selftest-") as tmp:
        root = Path(tmp)
        cohort = generate_cohort(root / "data", **SELFTEST_COHORT)
        output_dir = root / "run"
        config, warnings = build_config(selftest_argv(cohort, output_dir, base))
        code, summary = run_training(config, warnings)
        checks.append(Check("training run", code == 0 and summary is not None, f"exit code {code}"))
        if summary is not None:
            validated = [h for h in summary["history"] if "val_dice" in h]
            first = validated[0]["val_dice"] if validated else math.nan
            best = summary["best_val_dice"] or math.nan
            learned = best >= SELFTEST_MIN_DICE and best > first
            checks.append(Check("learning", learned, f"val Dice on ICH-positive scans {first:.3f} after epoch "
                                                     f"{validated[0]['epoch'] if validated else '?'} -> best "
                                                     f"{best:.3f} (needs >= {SELFTEST_MIN_DICE})"))
            checks.append(_clicks_check(validated, summary["best_val_dice"]))
            _run_check(checks, "output files", lambda: _check_files(output_dir))
            _run_check(checks, "encoder export", lambda: blip2.check_encoder_export(
                output_dir / "sam_encoder.pth", output_dir / "best_model.pth"))
            try:
                import transformers  # noqa: F401  (optional: a test-only dependency)
            except ImportError:
                checks.append(Check.skip("BLIP-2 Q-Former", "transformers not installed"))
            else:
                _run_check(checks, "BLIP-2 Q-Former",
                           lambda: blip2.check_qformer(output_dir / "sam_encoder.pth"))
            resume_config, _ = build_config(selftest_argv(cohort, output_dir, base, SELFTEST_EPOCHS + 1)
                                            + ["--resume", "auto"])
            resume_code, resumed = run_training(resume_config)
            resumed_ok = (resume_code == 0 and resumed is not None and resumed["epochs_completed"] ==
                          SELFTEST_EPOCHS + 1 and len(resumed["history"]) == SELFTEST_EPOCHS + 1)
            checks.append(Check("resume", resumed_ok, f"--resume auto continued to epoch "
                                                      f"{resumed['epochs_completed'] if resumed else '?'}"))
    print(format_report("ichseg self-test report", checks, time.time() - started), file=sys.stdout, flush=True)
    return 0 if all_passed(checks) else 1


def _clicks_check(validated: list[dict], best_dice: float | None) -> Check:
    """At the best epoch, clicks must help, not hurt: Dice after 1 click >= prompt-free, after 5 >= after 1 (within
    CLICK_TOLERANCE: one voxel of a small bleed moves Dice by about that much)."""
    best = next((h for h in validated if h["val_dice"] == best_dice), None)
    if best is None or not best_dice:
        return Check.skip("clicks", "no validated epoch with a positive Dice to compare clicks at")
    free, one, five = best["val_dice"], best["val_dice_1click"], best["val_dice_5click"]
    helped = one >= free - CLICK_TOLERANCE and five >= one - CLICK_TOLERANCE
    return Check("clicks", helped, f"val Dice at epoch {best['epoch']}: prompt-free {free:.3f}, 1 click {one:.3f}, "
                                   f"3 clicks {best['val_dice_3click']:.3f}, 5 clicks {five:.3f}")


def _check_files(output_dir: Path) -> str:
    missing = [name for name in EXPECTED_FILES if not (output_dir / name).is_file()]
    summaries = list(output_dir.glob("training_summary_*.json"))
    assert not missing, f"missing {', '.join(missing)}"
    assert summaries, "no training_summary_*.json"
    for name in ("best_model.pth", "latest_model.pth", "sam_encoder.pth"):
        torch.load(output_dir / name, map_location="cpu", weights_only=True)
    return f"{len(EXPECTED_FILES) + 1} files present; checkpoints load with weights_only=True"
