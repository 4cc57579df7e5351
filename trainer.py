"""The training lifecycle: one Trainer whose ``fit()`` reads like a table of contents.

fit → on_fit_start (resume, tracking) → for each epoch: train_epoch → validate (every ``val_every``) →
on_epoch_end (schedule, checkpoints, early stopping, logs) → on_fit_end (summary).

What a step computes (prompted forward, loss) lives in ``objective.py``; how the optimiser is set up and steered
(learning-rate groups, schedules, early stopping) in ``optimization.py``; the validation pass in ``evaluation.py``;
the collectives of a torchrun job in ``distributed.py``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

import guards
import reporting
import tracking
import utils
from config import Config
from data.case_sampling import HardCaseSampling
from data.preprocess import Preprocessing
from inference import autocast_context, choose_amp_dtype
from distributed import RankGroup
from evaluation import evaluate
from memory import MemoryMonitor
from mining import FalsePositiveMining
from model import export_encoder, load_trained_weights, read_trained_checkpoint
from objective import PromptedSegmentation, SegmentationLoss, hemorrhage_weight_cap
from optimization import EarlyStopping, build_scheduler, group_sizes, parameter_groups

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
LATEST_NAME = "latest_model.pth"
BEST_NAME = "best_model.pth"
ENCODER_NAME = "sam_encoder.pth"
# Epochs between learning-curve redraws when no validation ran (see on_epoch_end).
PLOT_EVERY = 10


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: training diverged."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; ``latest_model.pth`` was written and the run can be resumed."""


# --------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EpochProgress:
    """Where an interrupted epoch stopped, so a resumed run replays it exactly from there."""

    epoch: int = 0
    batches_done: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    nonfinite_skipped: int = 0
    oom_skipped: int = 0


class Trainer:
    """Fine-tunes a SamMed3D on hemorrhage crops; see the module docstring for the lifecycle.

    Collaborators are passed in (nothing is built from globals): the model, the two loaders, the device, the
    config, an experiment tracker and the helpers that write files. Only rank 0 writes files and logs.
    """

    def __init__(self, config: Config, model: nn.Module, train_loader: Any, val_loader: Any,
                 device: torch.device, tracker: tracking.Tracker, output_dir: Path, *, rank: int = 0,
                 world_size: int = 1,
                 set_loader_epoch: Callable[..., None] | None = None,
                 extra_summary: dict[str, Any] | None = None, preprocessing: Preprocessing | None = None):
        self.config = config
        self.model = model.to(device)
        self.device = device
        self.train_loader, self.val_loader = train_loader, val_loader
        self.tracker = tracker
        self.output_dir = Path(output_dir)
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.ranks = RankGroup(world_size, device)
        self.set_loader_epoch = set_loader_epoch or (lambda loader, epoch, **_: None)
        self.extra_summary = extra_summary or {}
        t = config.train

        self.roi_size = int(model.img_size)
        # What the data loaders fed the model; stored in every checkpoint and in sam_encoder.pth.
        self.preprocessing = preprocessing or Preprocessing.from_config(config.data, self.roi_size)
        self.amp_dtype = choose_amp_dtype(device, t.use_mixed_precision)
        # GradScaler only matters for fp16; enabled=False makes every call a no-op, keeping one code path.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        groups = parameter_groups(self.model, config)
        if not groups:
            raise ValueError("the model has no trainable parameters (is everything frozen?)")
        # Fused: one kernel for all tensors (tiny build, 2 CPU cores: 3.8 -> 1.2 ms per step; bench/op_bench.py).
        fused = device.type in ("cpu", "cuda") or None
        self.optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=fused)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.loss_fn = SegmentationLoss(t.ich_loss_weight, t.decoder_loss_weight, t.hard_voxel_fraction,
                                        t.empty_crop_dice_volume)
        self.early_stopping = EarlyStopping(patience=t.patience)
        sampler = getattr(train_loader, "sampler", None)
        self.hard_cases = (HardCaseSampling(sampler.case_ids, config.data.hard_case_fraction, sampler.case_ich or None)
                           if config.data.hard_case_fraction > 0 and getattr(sampler, "case_ids", None) else None)
        # Mining reads the cached training scans behind the loader (StageDataset.base).
        scans = getattr(getattr(train_loader, "dataset", None), "base", None)
        self.mining = (FalsePositiveMining(t.false_positive_mining_every, scans, self.roi_size,
                                           self.preprocessing.target_spacing, self.ranks, rank,
                                           config.model.min_component_ml, config.model.min_component_peak)
                       if config.data.false_positive_crop_fraction > 0 and scans is not None else None)
        if config.data.false_positive_crop_fraction > 0 and scans is None:
            logger.warning("--false_positive_crop_fraction: this training loader has no cached scans to mine; off")
        self.prompt_generator = torch.Generator().manual_seed(t.seed + 1)

        step_module: nn.Module = PromptedSegmentation(self.model)
        if world_size > 1:
            # Prompt-free rounds leave the point embeddings unused, hence find_unused_parameters. Every
            # micro-batch's backward all-reduces (no ``no_sync`` for accumulation): with no_sync, a group whose last
            # micro-batch is skipped (non-finite loss) would step on unreduced, per-rank gradients and the ranks'
            # weights would drift apart without any error.
            step_module = nn.parallel.DistributedDataParallel(
                step_module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True)
        if t.compile:
            step_module = torch.compile(step_module)
        self.step_module = step_module

        self.start_epoch = 0
        self.global_step = 0
        self.progress = EpochProgress()
        self.history: list[dict[str, Any]] = []
        self.stop_reason = "max_epochs"
        self.consecutive_nonfinite = 0
        self._stop_signal: int | None = None
        self.memory = MemoryMonitor(device)
        self.eta = reporting.EtaEstimator()
        self.fit_started = 0.0

    # ---------------------------------------------------------------------------------------------- lifecycle
    def fit(self) -> dict[str, Any]:
        """Train until ``epochs``, early stopping or a signal; returns the training summary."""
        self.on_fit_start()
        try:
            with utils.stop_signals_to(self._request_stop):
                for epoch in range(self.start_epoch, self.config.train.epochs):
                    self.on_epoch_start(epoch)
                    train_stats = self.train_epoch(epoch)
                    val_stats = self._timed_validation(epoch) if self._is_validation_epoch(epoch) else {}
                    self.on_epoch_end(epoch, train_stats, val_stats)
                    if self.early_stopping.should_stop:
                        self.stop_reason = "early_stopping"
                        logger.info("early stopping: no validation Dice improvement for %d validations (best "
                                    "%.4f at epoch %d)", self.early_stopping.patience, self.early_stopping.best,
                                    self.early_stopping.best_epoch + 1)
                        break
        except BaseException:
            self.tracker.finish()  # keep the wandb run resumable rather than left half-open
            raise
        return self.on_fit_end()

    def on_fit_start(self) -> None:
        self.fit_started = time.time()
        if self.config.train.resume:
            self._resume(self.config.train.resume)
        self.tracker.start(run_id=getattr(self, "_resumed_run_id", None))
        logger.info("training %s for epochs %d..%d on %s (AMP: %s, %d trainable parameters; learning rates %s)",
                    self.config.model.name, self.start_epoch + 1, self.config.train.epochs, self.device,
                    self.amp_dtype or "off", sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                    ", ".join(f"{g['name']} {g['lr']:.1e}" for g in self.optimizer.param_groups))

    def on_epoch_start(self, epoch: int) -> None:
        self.memory.reset()
        t = self.config.train
        self.loss_fn.hemorrhage_weight_cap = hemorrhage_weight_cap(epoch, t.epochs, t.final_hemorrhage_weight)
        sampling: dict[str, Any] = {"case_weights": self.hard_cases.weights()} if self.hard_cases is not None else {}
        if self.mining is not None:
            sampling["mined"] = self.mining.before_epoch(epoch, self.model, self.device, self.amp_dtype)
        self.set_loader_epoch(self.train_loader, epoch, **sampling)
        if self.progress.epoch != epoch:
            self.progress = EpochProgress(epoch=epoch)

    def on_epoch_end(self, epoch: int, train_stats: dict[str, Any], val_stats: dict[str, Any]) -> None:
        improved = False
        if val_stats:
            improved = self.early_stopping.update(val_stats["val_dice"], epoch)
        self._step_scheduler(val_stats)
        record = {"epoch": epoch + 1, **train_stats, **val_stats, "lr": self._current_lr(),
                  "best_val_dice": self.early_stopping.best if self.early_stopping.best > -math.inf else None,
                  **self.memory.snapshot()}
        self.history.append(record)
        self.progress = EpochProgress(epoch=epoch + 1)
        self.start_epoch = epoch + 1
        if self.is_main:
            self.save_checkpoint(self.output_dir / LATEST_NAME)
            if improved:
                self.save_checkpoint(self.output_dir / BEST_NAME)
                self.export_encoder(self.output_dir / ENCODER_NAME, epoch, val_stats["val_dice"])
            if self.config.train.save_every and (epoch + 1) % self.config.train.save_every == 0:
                self.save_checkpoint(self.output_dir / f"checkpoint_epoch_{epoch + 1:04d}.pth")
                utils.cleanup_checkpoints(self.output_dir, self.config.train.keep_checkpoints)
            reporting.write_metrics_csv(self.output_dir / "metrics.csv", self.history)
            # Drawing costs ~1 s of CPU (matplotlib), as much as a tiny-build epoch: redraw when validation added
            # points, at the end, and every PLOT_EVERY epochs in between.
            if val_stats or epoch + 1 == self.config.train.epochs or (epoch + 1) % PLOT_EVERY == 0:
                reporting.plot_learning_curves(self.history, self.output_dir / "learning_curves.png")
            self.tracker.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=epoch + 1)
        self.eta.update(record["epoch_time_s"], val_stats.get("val_time_s"))
        remaining = self.eta.eta_seconds(self.config.train.epochs - epoch - 1, sum(
            self._is_validation_epoch(e) for e in range(epoch + 1, self.config.train.epochs)))
        if self.mining is not None and remaining is not None:
            remaining += self.mining.seconds_left(epoch + 1, self.config.train.epochs)
        logger.info("%s", reporting.epoch_line(record, self.config.train.epochs, remaining, improved))

    def on_fit_end(self) -> dict[str, Any]:
        summary = {
            "config": self.config.to_dict(),
            **self.extra_summary,
            "history": self.history,
            "best_epoch": self.early_stopping.best_epoch + 1 if self.early_stopping.best_epoch >= 0 else None,
            "best_val_dice": self.early_stopping.best if self.early_stopping.best > -math.inf else None,
            "best_metrics": next((h for h in self.history if h["epoch"] == self.early_stopping.best_epoch + 1),
                                 None),
            "stop_reason": self.stop_reason,
            "epochs_completed": self.start_epoch,
            "global_step": self.global_step,
            "total_time_s": time.time() - self.fit_started,
            # Mean share of training time spent waiting for batches (rank 0's loader): > ~0.2 means the GPU starves.
            "data_wait_fraction": (sum(h.get("data_wait_fraction", 0.0) for h in self.history) / len(self.history)
                                   if self.history else None),
            "peak_memory": {key: max((h.get(key) or 0.0) for h in self.history) if self.history else None
                            for key in ("peak_rss_gb", "peak_gpu_allocated_gb", "peak_gpu_reserved_gb")},
            "system": utils.collect_system_info(self.device),
        }
        if self.is_main:
            path = reporting.write_training_summary(self.output_dir, summary)
            summary["summary_path"] = str(path)
        self.tracker.finish()
        return summary

    # ------------------------------------------------------------------------------------------------ training
    def _choose_click_rounds(self) -> int:
        mode = self.config.train.prompt_mode
        if mode == "none":
            return 0
        if mode == "clicks":
            return self.config.train.click_rounds
        # mixed: half the batches automatic, half interactive; drawn from the checkpointed prompt generator.
        automatic = torch.rand(1, generator=self.prompt_generator).item() < 0.5
        return 0 if automatic else self.config.train.click_rounds

    def _batches(self, epoch: int) -> Iterator[tuple[int, dict[str, Any]]]:
        limit = self.config.train.max_steps_per_epoch
        for index, batch in enumerate(self.train_loader):
            if limit is not None and index >= limit:
                return
            if index < self.progress.batches_done:
                continue  # replaying an interrupted epoch: these micro-batches were already trained on
            yield index, batch

    def epoch_length(self) -> int:
        length = len(self.train_loader)
        limit = self.config.train.max_steps_per_epoch
        return min(length, limit) if limit is not None else length

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training loader with exact gradient accumulation."""
        self.model.train()
        t = self.config.train
        num_batches = self.epoch_length()
        sizes = group_sizes(num_batches, t.gradient_accumulation_steps)
        started = time.time()
        data_time = compute_time = 0.0
        progress = self.progress
        bar = tqdm(total=num_batches, initial=progress.batches_done, desc=f"epoch {epoch + 1}/{t.epochs}",
                   disable=None if self.is_main else True, leave=False, dynamic_ncols=True)
        fetch_started = time.time()
        for index, batch in self._batches(epoch):
            data_time += time.time() - fetch_started
            step_started = time.time()
            group_size = sizes[index // t.gradient_accumulation_steps]
            ends_group = (index + 1) % t.gradient_accumulation_steps == 0 or index + 1 == num_batches
            loss = self._train_micro_batch(batch, group_size)
            if loss is not None:
                progress.loss_sum += loss
                progress.loss_count += 1
            progress.batches_done = index + 1
            if ends_group:
                self._optimizer_step()
                if self._stop_requested():
                    bar.close()
                    self._interrupt()
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # honest compute time; the data-wait split is what we report
            compute_time += time.time() - step_started
            self.memory.sample()
            bar.update(1)
            bar.set_postfix(loss=f"{progress.loss_sum / max(progress.loss_count, 1):.4f}",
                            lr=f"{self._current_lr():.1e}")
            fetch_started = time.time()
        bar.close()
        if self.hard_cases is not None:
            self.hard_cases.end_epoch(self.ranks.gather)
        mean_loss = progress.loss_sum / progress.loss_count if progress.loss_count else math.nan
        elapsed = time.time() - started
        return {"train_loss": self.ranks.mean(mean_loss), "epoch_time_s": elapsed,
                "data_time_s": data_time, "compute_time_s": compute_time,
                "data_wait_fraction": data_time / elapsed if elapsed > 0 else 0.0,
                "nonfinite_skipped": progress.nonfinite_skipped, "oom_skipped": progress.oom_skipped}

    def _train_micro_batch(self, batch: dict[str, Any], group_size: int) -> float | None:
        """Forward and backward of one micro-batch; returns its loss, or None when the batch was skipped."""
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        rounds = self._choose_click_rounds()
        try:
            with autocast_context(self.device, self.amp_dtype):
                out = self.step_module(images, labels, rounds, self.prompt_generator)
                loss, parts = self.loss_fn(out["masks"], out["ich_logit"], labels, out["coarse_masks"])
            # A host sync per micro-batch, accepted so that a NaN never reaches the weights. Under DDP the skip is
            # decided together: a rank that skipped backward while the others ran it would pair its next
            # gradient all-reduce with their current one (silently mixed gradients, then a hang or a crash).
            if not self.ranks.all_true(bool(torch.isfinite(loss))):
                self._on_nonfinite_loss(batch)
                return None
            self.consecutive_nonfinite = 0
            self.scaler.scale(loss / group_size).backward()
            if self.hard_cases is not None:
                self.hard_cases.record(batch["case_id"], parts["sample_mask_loss"].tolist())
            return float(loss.detach())
        except torch.OutOfMemoryError:
            self._on_out_of_memory(batch)
            return None

    def _on_nonfinite_loss(self, batch: dict[str, Any]) -> None:
        self.progress.nonfinite_skipped += 1
        self.consecutive_nonfinite += 1
        logger.warning("non-finite loss on %s: micro-batch skipped (%d in a row)",
                       ", ".join(map(str, batch.get("case_id", []))), self.consecutive_nonfinite)
        if self.consecutive_nonfinite >= self.config.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive non-finite losses: training diverged. Lower --lr, "
                "keep --max_grad_norm > 0, or disable --use_mixed_precision; resume from best_model.pth.")

    def _on_out_of_memory(self, batch: dict[str, Any]) -> None:
        if self.world_size > 1:
            # The other ranks are already inside this step's collectives (loss vote or gradient all-reduce) and
            # cannot be matched any more: failing fast lets torchrun stop the job instead of hanging until timeout.
            raise RuntimeError(
                f"out of memory on rank {self.rank} ({', '.join(map(str, batch.get('case_id', [])))}): under DDP a "
                "micro-batch cannot be skipped on one rank. Lower --batch_size (raise --gradient_accumulation_steps"
                "), add --use_gradient_checkpointing or --use_mixed_precision, and restart with --resume auto")
        self.progress.oom_skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.warning("out of memory on %s: micro-batch skipped (the group's gradients were dropped). Try a "
                       "smaller --batch_size with larger --gradient_accumulation_steps, --use_gradient_checkpointing "
                       "or --use_mixed_precision.", ", ".join(map(str, batch.get("case_id", []))))

    def _optimizer_step(self) -> None:
        """Unscale, clip, step, and clear the gradients of the finished accumulation group."""
        t = self.config.train
        has_grad = any(p.grad is not None for p in self.model.parameters())
        if has_grad:
            self.scaler.unscale_(self.optimizer)
            if t.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               t.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
        self.optimizer.zero_grad(set_to_none=True)

    def _step_scheduler(self, val_stats: dict[str, Any]) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if val_stats and not math.isnan(val_stats["val_dice"]):
                self.scheduler.step(val_stats["val_dice"])
        else:
            self.scheduler.step()

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ---------------------------------------------------------------------------------------------- validation
    def _timed_validation(self, epoch: int) -> dict[str, Any]:
        started = time.time()
        stats = self.validate(epoch)
        stats["val_time_s"] = time.time() - started
        return stats

    def _is_validation_epoch(self, epoch: int) -> bool:
        every = self.config.train.val_every
        return (epoch + 1) % every == 0 or epoch + 1 == self.config.train.epochs

    def validate(self, epoch: int) -> dict[str, Any]:
        """Whole-volume validation of the current model (``evaluation.evaluate``); rank 0 may save an overlay."""
        log_images = (self.config.log.log_images and self.is_main
                      and (epoch + 1) % self.config.log.log_freq == 0)
        on_positive = (lambda batch, image, label, prediction:
                       self._save_overlay(epoch, batch, image, label, prediction)) if log_images else None
        self.model.eval()
        try:
            return evaluate(self.model, self.val_loader, self.device, self.roi_size, self.amp_dtype, self.loss_fn,
                            self.preprocessing.target_spacing, self.ranks, progress=self.is_main,
                            on_first_positive=on_positive, min_component_ml=self.config.model.min_component_ml,
                            min_component_peak=self.config.model.min_component_peak)
        finally:
            self.model.train()

    def _save_overlay(self, epoch: int, batch: dict[str, Any], image: torch.Tensor, label: torch.Tensor,
                      prediction: torch.Tensor) -> None:
        case = batch.get("case_id", ["case"])[0]
        path = self.output_dir / "images" / f"epoch{epoch + 1:04d}_{case}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        reporting.save_overlay_png(image[0, 0].float().cpu().numpy(), label[0, 0].cpu().numpy(),
                                   prediction[0, 0].cpu().numpy(), path, f"epoch {epoch + 1}: {case}")
        self.tracker.log_image("val/overlay", path, step=epoch + 1)

    def _stop_requested(self) -> bool:
        """Whether a stop signal arrived on any rank. torchrun forwards a signal to every worker, but not at the
        same instant: a rank that stopped one step before the others would leave them waiting in an all-reduce."""
        self._stop_signal = self.ranks.max_int(self._stop_signal or 0) or None
        return self._stop_signal is not None

    # ---------------------------------------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """Complete training state as plain data (loads with ``torch.load(weights_only=True)``)."""
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "epoch": self.start_epoch,
            "epoch_progress": dataclasses.asdict(self.progress),
            "global_step": self.global_step,
            "best_metric": self.early_stopping.best,
            "early_stopping": self.early_stopping.state_dict(),
            "history": self.history,
            "rng_state": utils.capture_rng_state(),
            "prompt_generator_state": self.prompt_generator.get_state(),
            "wandb_run_id": self.tracker.run_id,
            "config": self.config.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "hard_cases": self.hard_cases.state_dict() if self.hard_cases is not None else None,
            "false_positive_mining": self.mining.state_dict() if self.mining is not None else None,
        }

    def save_checkpoint(self, path: Path) -> None:
        utils.atomic_torch_save(self.checkpoint_state(), path)

    def export_encoder(self, path: Path, epoch: int, val_dice: float) -> None:
        """Write sam_encoder.pth: the encoder and representation head for the BLIP-2 path (see model.py)."""
        payload = export_encoder(self.model)
        payload["preprocessing"] = self.preprocessing.to_dict()
        payload["provenance"] = {"epoch": epoch + 1, "val_dice": val_dice, "config": self.config.to_dict()}
        utils.atomic_torch_save(payload, path)

    def _resume(self, resume: str) -> None:
        path = self.output_dir / LATEST_NAME if resume == "auto" else Path(resume)
        if not path.is_file():
            if resume == "auto":
                logger.info("--resume auto: no %s yet, starting fresh", path)
                return
            raise FileNotFoundError(f"--resume {path}: checkpoint not found")
        # Names the file on any unreadable, unsafe or foreign content (the checks model.load_trained makes).
        state = read_trained_checkpoint(path, required=())
        # A checkpoint of other settings (preprocessing, architecture, trainable set) is refused in one line.
        guards.check_resume_state(state, self.config, path)
        load_trained_weights(self.model, state, path)
        guards.check_parameter_groups(state["optimizer_state_dict"], self.optimizer, path)
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        self.scheduler.load_state_dict(state["scheduler_state_dict"])
        self.scaler.load_state_dict(state["scaler_state_dict"])
        self.start_epoch = int(state["epoch"])
        self.progress = EpochProgress(**state["epoch_progress"])
        self.global_step = int(state["global_step"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.early_stopping.patience = self.config.train.patience
        self.history = list(state["history"])
        utils.restore_rng_state(state["rng_state"])
        self.prompt_generator.set_state(state["prompt_generator_state"])
        self._resumed_run_id = state.get("wandb_run_id")
        if self.hard_cases is not None and state.get("hard_cases"):
            self.hard_cases.load_state_dict(state["hard_cases"])
        if self.mining is not None and state.get("false_positive_mining"):
            self.mining.load_state_dict(state["false_positive_mining"])
        if self.start_epoch >= self.config.train.epochs:
            logger.warning("%s already completed %d epochs and --epochs is %d: nothing left to train (raise "
                           "--epochs to continue)", path, self.start_epoch, self.config.train.epochs)
        logger.info("resumed from %s at epoch %d (micro-batch %d), best val Dice %.4f", path,
                    self.start_epoch + 1, self.progress.batches_done, self.early_stopping.best)

    # ------------------------------------------------------------------------------------------------ signals
    def _request_stop(self, signum: int) -> None:
        """SIGINT/SIGTERM ask for a stop at the next optimiser step, where the state is consistent."""
        if self._stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self._stop_signal = signum
        logger.warning("received %s: saving latest_model.pth at the next optimiser step", signal.Signals(signum).name)

    def _interrupt(self) -> None:
        self.stop_reason = "interrupted"
        if self.is_main:
            self.save_checkpoint(self.output_dir / LATEST_NAME)
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(self._stop_signal).name}; state saved to "
            f"{self.output_dir / LATEST_NAME}. Resume with the same command plus --resume auto")

