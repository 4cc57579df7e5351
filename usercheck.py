"""``python train.py --test`` with data flags: a check of the user's own run, in a minute or two, before the real one.

    python train.py --test --train_csv train.csv --val_csv val.csv --mask_dir masks --output_dir out [your flags]

The real pieces run with the user's settings, in order; each is a line of the PASS / FAIL / SKIP report:

settings → weights (resolved before any data work: weights that are neither cached nor downloadable end the check
with the one clear message, exit 2) → cohort (the real validator, every file) → model (built with its weights,
loaded strictly) → system (disk, RAM and GPU memory against the estimate) → data loading (the real loaders over
the first few training scans and one validation scan) → training steps (``CHECK_STEPS`` micro-batches, or fewer
with ``--max_steps_per_epoch``, at the user's batch size, precision, accumulation and prompt mode; with several,
the first is an untimed warm-up) → data wait → validation window (one window of the validation scan, prompt-free,
with the loss) → peak memory (GPU: ``torch.cuda.max_memory_allocated`` against the card; CPU: the process's peak
RSS against the RAM) → epoch time (steps per epoch × the measured s/step + the estimated validation: its sliding
windows and simulated clicks × the measured window time).

A failure stops the sequence; the checks after it are SKIP, as is a check with nothing to check. Nothing is
written to ``--output_dir`` except ``selftest_report.json`` (every check and measurement, the resolved config, the
system); the preprocessing cache and the trainer's files go to a temporary folder, removed afterwards. Exit codes
as train.py: 0 PASS, 1 FAIL, 2 weights that cannot be had (or an unusable ``--device``).
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil
import torch

import dataloader
import tracking
import utils
from checks import Check, all_passed, format_report
from config import Config, replace_section
from inference import SIMULATED_CLICKS, SLIDING_WINDOW_OVERLAP, sliding_window_logits
from memory import RssSampler, estimate_training_memory_gb
from model import CheckpointError, build_model, resolve_checkpoint
from reporting import format_duration, to_jsonable
from trainer import Trainer

logger = logging.getLogger(__name__)

REPORT_NAME = "selftest_report.json"
# The data flags that turn ``--test`` into a check of the user's own run.
DATA_FLAGS = ("train_csv", "val_csv", "mask_dir")
CHECK_STEPS = 3
# Above this share of the device's memory the check fails: the real run meets more click rounds and larger
# validation volumes than a few steps and one window.
MEMORY_LIMIT_FRACTION = 0.9
# Above this share of the step time spent waiting for batches the loader, not the model, sets the pace.
DATA_WAIT_HINT = 0.3
# Problems of an invalid cohort shown in the report (all of them are in the log).
MAX_PROBLEMS_SHOWN = 10
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def has_data_flags(config: Config) -> bool:
    """Whether ``--test`` was given the user's data (then it checks their run, not a synthetic one)."""
    return any(getattr(config.data, name) is not None for name in DATA_FLAGS)


# ------------------------------------------------------------------------------------------------- estimates

def sliding_window_count(shape: Sequence[int], roi: int, overlap: float = SLIDING_WINDOW_OVERLAP) -> int:
    """Windows MONAI's sliding-window inference visits on a volume of ``shape`` (padded to ``roi`` first)."""
    interval = max(int(roi * (1 - overlap)), 1)
    return math.prod(1 if size <= roi else math.ceil((size - roi) / interval) + 1 for size in shape)


def steps_per_epoch(n_train: int, batch_size: int, max_steps: int | None) -> int:
    """Micro-batches in one epoch: one crop per training scan, capped by ``--max_steps_per_epoch``."""
    steps = math.ceil(n_train / batch_size)
    return min(steps, max_steps) if max_steps is not None else steps


def validation_seconds(window_counts: Sequence[int], window_s: float, clicks: int = max(SIMULATED_CLICKS)) -> float:
    """A validation pass: each scan's prompt-free windows plus up to ``clicks`` simulated clicks, each of which
    decodes one more window (``inference.apply_clicks``), at ``window_s`` seconds per window."""
    return sum(windows + clicks for windows in window_counts) * window_s


def epoch_seconds(steps: int, s_per_step: float, validation_s: float, val_every: int) -> float:
    """One epoch: its training steps plus, averaged over epochs, validation every ``val_every`` epochs."""
    return steps * s_per_step + validation_s / val_every


def capped_epoch(trainer: Trainer, config: Config, epoch: int, steps: int | None) -> dict[str, Any]:
    """``Trainer.train_epoch`` over at most ``steps`` micro-batches (None: the whole loader). The trainer reads the
    cap from its config when the epoch starts; ``on_epoch_start`` also resets the peak-memory counters."""
    trainer.config = replace_section(config, "train", max_steps_per_epoch=steps)
    trainer.on_epoch_start(epoch)
    stats = trainer.train_epoch(epoch)
    stats["steps"] = trainer.epoch_length()
    return stats


# ------------------------------------------------------------------------------------------------- the check

class CheckFailed(Exception):
    """A stage of the check failed: ``detail`` is the report line, ``exit_code`` what train.py would return."""

    def __init__(self, detail: str, exit_code: int = EXIT_FAILED):
        super().__init__(detail)
        self.detail, self.exit_code = detail, exit_code


@dataclass(frozen=True)
class Skipped:
    """What a stage returns when it has nothing to check (reported as SKIP with ``reason``)."""

    reason: str


class UserRunCheck:
    """The stages of the check, run in order by ``run``; each returns its PASS detail (or ``Skipped``) and hands
    what it built to the next through attributes."""

    def __init__(self, config: Config, work_dir: Path):
        self.user_config = config
        # The user's settings with every file the run would write moved into the temporary folder.
        self.config = replace_section(replace_section(config, "data", cache_dir=str(work_dir / "cache")),
                                      "train", output_dir=str(work_dir / "run"))
        self.measurements: dict[str, Any] = {}
        self.device = torch.device("cpu")
        # What the stages build and hand on, in the order they appear.
        self.weights: Path | None = None
        self.cohort: dataloader.Cohort | None = None
        self.model: torch.nn.Module | None = None
        self.preprocessing: dataloader.Preprocessing | None = None
        self.loaders: tuple[Any, Any] | None = None
        self.steps = 0
        self.trainer: Trainer | None = None
        self.stats: dict[str, Any] = {}
        self.s_per_step = math.nan
        self.gpu_peak_gb: float | None = None
        self.window_s: float | None = None
        # The process's RSS is sampled from the first training step to the end of the validation window.
        self._sampling = contextlib.ExitStack()
        self.rss: RssSampler | None = None

    def stages(self) -> list[tuple[str, Callable[[], str | Skipped]]]:
        return [("settings", self.settings), ("weights", self.resolve_weights), ("cohort", self.validate_cohort),
                ("model", self.build_model), ("system", self.system), ("data loading", self.data_loading),
                ("training steps", self.training_steps), ("data wait", self.data_wait),
                ("validation window", self.validation_window), ("peak memory", self.peak_memory),
                ("epoch time", self.epoch_time)]

    def run(self) -> tuple[list[Check], int]:
        checks: list[Check] = []
        failed: str | None = None
        code = EXIT_OK
        with self._sampling:
            for name, stage in self.stages():
                if failed is not None:
                    checks.append(Check.skip(name, f"not run: '{failed}' failed"))
                    continue
                try:
                    result = stage()
                except CheckFailed as failure:
                    logger.error("%s: %s", name, failure.detail)
                    checks.append(Check(name, False, failure.detail))
                    failed, code = name, failure.exit_code
                    continue
                checks.append(Check.skip(name, result.reason) if isinstance(result, Skipped)
                              else Check(name, True, result))
        # Drop the loaders (and their worker processes) before the temporary folder they read from goes away.
        self.trainer = self.loaders = self.model = None
        gc.collect()
        return checks, code

    # ----------------------------------------------------------------------------------------------- stages
    def settings(self) -> str:
        t = self.config.train
        try:
            self.device = utils.resolve_device(t.device)
        except ValueError as error:
            raise CheckFailed(str(error), EXIT_USAGE) from error
        utils.seed_everything(t.seed)
        warnings = self.user_config.validate()
        for warning in warnings:
            logger.warning("config: %s", warning)
        return (f"{self.config.model.name}, batch {t.batch_size} × accumulation {t.gradient_accumulation_steps}, "
                f"mixed precision {'on' if t.use_mixed_precision else 'off'}, prompts {t.prompt_mode}, "
                f"normalization {self.config.data.normalization}, on {self.device}; {len(warnings)} warning(s)"
                f"{' (logged)' if warnings else ''}")

    def resolve_weights(self) -> str | Skipped:
        name = self.config.model.pretrained_checkpoint
        if name is None:
            return Skipped("none: random initialisation (--pretrained_checkpoint none, or a model without "
                           "published weights)")
        try:
            self.weights = resolve_checkpoint(name)
        except CheckpointError as error:  # CheckpointUnavailableError offline, or a local file that is not there
            raise CheckFailed(str(error), EXIT_USAGE) from error
        return f"'{name}': {self.weights} ({self.weights.stat().st_size / 2**20:.0f} MiB)"

    def validate_cohort(self) -> str:
        try:
            self.cohort = dataloader.validate_cohort(self.config.data)
        except dataloader.DataValidationError as error:
            problems = [str(p) for p in error.problems]
            more = len(problems) - MAX_PROBLEMS_SHOWN
            shown = problems[:MAX_PROBLEMS_SHOWN] + ([f"... and {more} more (all are in the log above)"]
                                                     if more > 0 else [])
            raise CheckFailed(f"{len(problems)} problem(s); fix them all, then rerun:\n" + "\n".join(shown)) \
                from error
        for warning in self.cohort.warnings:  # the validator returns its warnings; the caller shows them
            logger.warning("data: %s", warning)
        train, val = self.cohort.train, self.cohort.val
        return (f"{len(train)} training ({sum(c.ich for c in train)} ICH-positive) and {len(val)} validation "
                f"scans; {len(self.cohort.warnings)} warning(s){' (logged)' if self.cohort.warnings else ''}")

    def build_model(self) -> str:
        t = self.config.train
        try:
            self.model = build_model(self.config.model)
        except CheckpointError as error:  # a file that does not fit the architecture, or is not a checkpoint
            raise CheckFailed(str(error)) from error
        estimate = estimate_training_memory_gb(self.model, t.batch_size, t.use_mixed_precision,
                                               click_rounds=t.click_rounds)
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.measurements.update(parameters=total, trainable_parameters=trainable, memory_estimate_gb=estimate)
        weights = ("pretrained weights loaded strictly (path and sha256 in the log)" if self.weights
                   else "random initialisation")
        return (f"{self.config.model.name}: {total:,} parameters ({trainable:,} trainable), {weights}; estimated "
                f"training memory {estimate:.1f} GiB")

    def system(self) -> str:
        estimate = self.measurements["memory_estimate_gb"]
        on_gpu = self.device.type == "cuda"
        warnings = utils.run_system_checks(self.device, self.user_config.train.output_dir,
                                           estimated_gpu_gb=estimate if on_gpu else None,
                                           estimated_ram_gb=None if on_gpu else estimate)
        return "disk, RAM and device memory look sufficient" if not warnings else "; ".join(warnings)

    def data_loading(self) -> str:
        t, cohort = self.config.train, self.cohort
        available = steps_per_epoch(len(cohort.train), t.batch_size, t.max_steps_per_epoch)
        self.steps = min(CHECK_STEPS, available)
        n_train = min(len(cohort.train), self.steps * t.batch_size)
        # A positive validation scan, so that the window's loss includes the Dice term.
        val = next((c for c in cohort.val if c.ich), cohort.val[0] if cohort.val else None)
        subset = dataloader.Cohort(train=cohort.train[:n_train], val=[val] if val else [], warnings=[],
                                   case_stats=cohort.case_stats)
        self.preprocessing = dataloader.Preprocessing.from_config(self.config.data, int(self.model.img_size))
        started = time.perf_counter()
        try:
            self.loaders = dataloader.build_dataloaders(self.config.data, self.preprocessing, subset,
                                                        batch_size=t.batch_size, device=self.device, seed=t.seed)
        except (RuntimeError, ValueError, OSError) as error:
            logger.exception("building the data loaders failed")
            raise CheckFailed(f"{type(error).__name__}: {error}") from error
        workers = getattr(self.loaders[0], "num_workers", 0)
        self.measurements["num_workers"] = workers
        return (f"{n_train} training and {len(subset.val)} validation scan(s) preprocessed and cached in "
                f"{time.perf_counter() - started:.1f} s; {workers} DataLoader worker(s)")

    def training_steps(self) -> str:
        t = self.config.train
        train_loader, val_loader = self.loaders
        self.trainer = Trainer(self.config, self.model, train_loader, val_loader, self.device,
                               tracking.NullTracker(), Path(t.output_dir), set_loader_epoch=dataloader.set_epoch,
                               preprocessing=self.preprocessing)
        self.rss = self._sampling.enter_context(RssSampler())
        warmup = 1 if self.steps > 1 else 0  # the first step pays for allocator, kernel choice, worker start
        started = time.perf_counter()
        try:
            if warmup:
                capped_epoch(self.trainer, self.config, 0, warmup)
            self.gpu_peak_gb = self._gpu_peak_gb()
            stats = capped_epoch(self.trainer, self.config, 1, self.steps - warmup)
        except RuntimeError as error:  # diverged (NonFiniteLossError) or a failing transform or kernel
            logger.exception("training steps failed")
            raise CheckFailed(f"{type(error).__name__}: {error}") from error
        warmup_s = time.perf_counter() - started - stats["epoch_time_s"]
        if stats["oom_skipped"]:
            raise CheckFailed(f"out of memory at --batch_size {t.batch_size}: lower it (and raise "
                              "--gradient_accumulation_steps), or add --use_gradient_checkpointing / "
                              "--use_mixed_precision")
        if stats["nonfinite_skipped"]:
            raise CheckFailed("non-finite loss: lower --lr, keep --max_grad_norm > 0, or try without "
                              "--use_mixed_precision")
        self.stats = stats
        self.s_per_step = stats["epoch_time_s"] / stats["steps"]
        self.measurements.update(steps=warmup + stats["steps"], s_per_step=self.s_per_step,
                                 warmup_s=warmup_s if warmup else None, train_loss=stats["train_loss"],
                                 data_wait_fraction=stats["data_wait_fraction"])
        precision = str(self.trainer.amp_dtype).replace("torch.", "") if self.trainer.amp_dtype else "fp32"
        timing = (f"{self.s_per_step:.2f} s/step after a {warmup_s:.1f} s warm-up step" if warmup
                  else f"{self.s_per_step:.2f} s/step (a single step: includes the warm-up)")
        return (f"{warmup + stats['steps']} micro-batch(es) of {t.batch_size} crops in {precision}: loss "
                f"{stats['train_loss']:.4f}, {timing}")

    def data_wait(self) -> str:
        fraction = self.stats["data_wait_fraction"]
        detail = (f"{100 * fraction:.0f}% of the timed steps spent waiting for batches "
                  f"({self.measurements['num_workers']} DataLoader worker(s))")
        if fraction > DATA_WAIT_HINT:
            detail += "; the loader sets the pace: raise --num_workers, keep --cache_in_memory"
        return detail

    def validation_window(self) -> str | Skipped:
        val_loader = self.loaders[1]
        if len(val_loader) == 0:
            return Skipped("no validation scans")
        roi = int(self.model.img_size)
        batch = next(iter(val_loader))
        image, label = batch["image"].to(self.device), batch["label"].to(self.device)
        # The window around the hemorrhage (the volume's centre for a negative scan), as a sliding window sees it.
        found = label[0, 0].nonzero()
        centre = (found.float().mean(0) if len(found) else torch.tensor(image.shape[2:]) / 2).tolist()
        box = tuple(slice(s, s + roi) for s in (int(min(max(round(c) - roi // 2, 0), max(n - roi, 0)))
                                                for c, n in zip(centre, image.shape[2:])))
        window, window_label = image[(..., *box)], label[(..., *box)]
        self.model.eval()
        started = time.perf_counter()
        try:
            logits = sliding_window_logits(self.model, window, roi, self.trainer.amp_dtype)
            with torch.no_grad():
                loss, _ = self.trainer.loss_fn([logits], None, window_label)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        except RuntimeError as error:  # out of memory included
            logger.exception("the validation window failed")
            raise CheckFailed(f"{type(error).__name__}: {error}") from error
        finally:
            self.model.train()
        self.window_s = time.perf_counter() - started
        self.measurements.update(validation_window_s=self.window_s, validation_window_loss=float(loss))
        return (f"one {roi}³ window of scan {batch['case_id'][0]} (volume {'×'.join(map(str, image.shape[2:]))} "
                f"after preprocessing): {self.window_s:.2f} s, loss {float(loss):.4f}")

    def peak_memory(self) -> str:
        assert self.rss is not None, "training_steps starts the RSS sampler"
        self._sampling.close()  # the measured part is over
        if self.device.type == "cuda":
            peak = max(self.gpu_peak_gb, self._gpu_peak_gb())
            total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            where = "GPU (torch.cuda.max_memory_allocated)"
            self.measurements.update(peak_gpu_gb=peak, gpu_total_gb=total)
        else:
            peak, total = self.rss.peak / 2**30, psutil.virtual_memory().total / 2**30
            workers = self.trainer.memory.snapshot()["peak_children_rss_gb"]
            where = f"RAM (process RSS; DataLoader workers another {workers:.2f} GiB)"
            self.measurements.update(peak_rss_gb=peak, ram_total_gb=total, workers_rss_gb=workers)
        detail = (f"{peak:.2f} GiB of {total:.1f} GiB {where}, {100 * peak / total:.0f}%; estimate "
                  f"{self.measurements['memory_estimate_gb']:.1f} GiB")
        if peak > MEMORY_LIMIT_FRACTION * total:
            raise CheckFailed(f"{detail}: too close to the limit for a whole run; lower --batch_size (raise "
                              "--gradient_accumulation_steps), or add --use_gradient_checkpointing / "
                              "--use_mixed_precision")
        return detail

    def epoch_time(self) -> str:
        t, cohort = self.user_config.train, self.cohort
        steps = steps_per_epoch(len(cohort.train), t.batch_size, t.max_steps_per_epoch)
        roi = int(self.model.img_size)
        windows = [sliding_window_count(dataloader.preprocessed_shape(
            cohort.case_stats[c.case_id]["shape"], c.spacing, self.preprocessing.target_spacing), roi)
            for c in cohort.val]
        clicks = max(SIMULATED_CLICKS)
        val_s = validation_seconds(windows, self.window_s or 0.0, clicks)
        epoch_s = epoch_seconds(steps, self.s_per_step, val_s, t.val_every)
        self.measurements.update(steps_per_epoch=steps, validation_windows=sum(windows), est_validation_s=val_s,
                                 est_epoch_s=epoch_s, est_run_s=epoch_s * t.epochs)
        every = "every epoch" if t.val_every == 1 else f"every {t.val_every} epochs"
        return (f"≈ {format_duration(epoch_s)} per epoch: {steps} step(s) × {self.s_per_step:.2f} s + validation ≈ "
                f"{format_duration(val_s)} {every} ({len(windows)} scans: {sum(windows)} windows + up to {clicks} "
                f"clicks each); {t.epochs} epochs ≈ {format_duration(epoch_s * t.epochs)} at most")

    def _gpu_peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None


def run_user_check(config: Config) -> int:
    """Check the run ``config`` describes (module docstring); prints the report, writes
    ``<output_dir>/selftest_report.json`` and returns the exit code (0 PASS, 1 FAIL, 2 unusable weights/device)."""
    started = time.time()
    utils.setup_logging(None)  # console only: train.log belongs to the real run
    output_dir = Path(config.train.output_dir)
    logger.info("train.py --test on your data: checking the run these flags describe; only %s is written to %s",
                REPORT_NAME, output_dir)
    with tempfile.TemporaryDirectory(prefix="ichseg-check-") as tmp:
        check = UserRunCheck(config, Path(tmp))
        checks, code = check.run()
        device, measurements = check.device, check.measurements
        del check
    elapsed = time.time() - started
    passed = all_passed(checks)
    code = code if code != EXIT_OK else (EXIT_OK if passed else EXIT_FAILED)
    print(format_report("ichseg --test on your run", checks, elapsed), flush=True)
    report = {"passed": passed, "exit_code": code, "elapsed_s": elapsed,
              "checks": [c.to_dict() for c in checks], "measurements": measurements,
              "config": config.to_dict(), "system": utils.collect_system_info(device)}
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / REPORT_NAME
    utils.atomic_write_text(path, json.dumps(to_jsonable(report), indent=2) + "\n")
    logger.info("report written to %s", path)
    return code
