"""Fine-tune SAM-Med3D on brain-CT hemorrhage masks.

    python train.py --train_csv train.csv --val_csv val.csv --mask_dir masks --output_dir out \\
        --pretrained_checkpoint sam_med3d_turbo.pth
    python train.py --test          # self-check on a generated synthetic cohort (tiny model, < 3 min on CPU)
    python train.py --folds_dir splits --mask_dir masks --output_dir out --fold all  # cross-validation
    torchrun --nproc_per_node 2 train.py ...   # several GPUs (or CPU processes with gloo)

``main`` reads as the whole program: parse → validate → system checks → data validation → build model → fit →
summary. Exit codes: 0 success, 1 failure (bad data, diverged training), 2 bad arguments, 130 interrupted.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from tqdm.contrib.logging import logging_redirect_tqdm

import dataloader
import guards
import tracking
import utils
from config import Config, ConfigError, build_config, replace_section
from crossval import run_cross_validation
from memory import estimate_training_memory_gb
from model import CheckpointError, CheckpointUnavailableError, build_model, resolve_checkpoint
from selftest import run_self_test
from trainer import NonFiniteLossError, Trainer, TrainingInterrupted

logger = logging.getLogger("ichseg.train")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def init_distributed(device_name: str) -> tuple[int, int, torch.device | None]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns (rank, world_size, device).

    NCCL on GPUs, gloo on CPU. The device is None for a single process (the caller resolves ``--device``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, None
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return rank, world_size, device


def run_training(config: Config, config_warnings: Sequence[str] = ()) -> tuple[int, dict | None]:
    """The real pipeline for a validated Config; returns (exit code, training summary or None)."""
    refusal = _refuse_before_work(config)
    if refusal is not None:
        return refusal, None
    rank, world_size, device = init_distributed(config.train.device)
    output_dir = Path(config.train.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    utils.setup_logging(output_dir if rank == 0 else None, rank=rank)
    try:
        if rank == 0 and config.train.overwrite:
            removed = guards.clear_previous_run(output_dir)
            if removed:
                logger.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), output_dir)
        for warning in config_warnings if rank == 0 else ():  # every rank sees the same config: say it once
            logger.warning("config: %s", warning)
        if config.data.cache_dir is None:
            config = replace_section(config, "data", cache_dir=str(output_dir / "cache"))
        if rank == 0:
            config.save(output_dir / "config.json")
        device = device or utils.resolve_device(config.train.device)
        utils.seed_everything(config.train.seed)
        if config.model.pretrained_checkpoint is not None:
            # Before any data work: weights that cannot be had (offline, not cached) end the run at once.
            try:
                resolve_checkpoint(config.model.pretrained_checkpoint)
            except CheckpointUnavailableError as error:
                logger.error("%s", error)
                return EXIT_USAGE, None

        try:
            cohort = dataloader.validate_cohort(config.data)
        except dataloader.DataValidationError as error:
            logger.error("%s", error)
            return EXIT_FAILED, None
        for warning in cohort.warnings if rank == 0 else ():
            logger.warning("data: %s", warning)
        stats = dataloader.compute_dataset_stats(cohort, config.data)
        if rank == 0:
            utils.atomic_write_text(output_dir / "dataset_stats.json", json.dumps(stats, indent=2) + "\n")
            logger.info("dataset statistics\n%s", dataloader.format_stats_table(stats))

        model = build_model(config.model)
        # The one Preprocessing of the run: the loaders use it, checkpoints and sam_encoder.pth store it.
        preprocessing = dataloader.Preprocessing.from_config(config.data, model.img_size)
        t = config.train
        estimate = estimate_training_memory_gb(model, t.batch_size, t.use_mixed_precision,
                                               click_rounds=t.click_rounds)
        if rank == 0:
            # On CPU the same activations and optimiser states live in RAM, so the estimate applies there.
            utils.run_system_checks(device, output_dir,
                                    estimated_gpu_gb=estimate if device.type == "cuda" else None,
                                    estimated_ram_gb=None if device.type == "cuda" else estimate)
        train_loader, val_loader = dataloader.build_dataloaders(
            config.data, preprocessing, cohort, batch_size=t.batch_size, device=device, seed=t.seed, rank=rank,
            world_size=world_size)
        tracker = tracking.build_tracker(rank == 0 and config.log.use_wandb, config.log.wandb_project,
                                         config.log.wandb_entity, config.to_dict(), output_dir)
        trainer = Trainer(config, model, train_loader, val_loader, device, tracker, output_dir, rank=rank,
                          world_size=world_size, set_loader_epoch=dataloader.set_epoch,
                          extra_summary={"dataset_stats": stats}, preprocessing=preprocessing)
        try:
            with logging_redirect_tqdm():  # log lines go through tqdm.write, so progress bars stay intact
                summary = trainer.fit()
        except TrainingInterrupted as interrupted:
            logger.warning("%s", interrupted)
            return EXIT_INTERRUPTED, None
        except guards.ResumeMismatchError as error:
            logger.error("%s", error)
            return EXIT_USAGE, None
        except (NonFiniteLossError, CheckpointError, FileNotFoundError) as error:
            # Diverged training, or a --resume file that is missing, corrupt or from another architecture.
            logger.error("%s", error)
            return EXIT_FAILED, None
        logger.info("done: best val Dice %s at epoch %s (%s); outputs in %s", summary["best_val_dice"],
                    summary["best_epoch"], summary["stop_reason"], output_dir)
        if world_size > 1:
            # Leave together: rank 0 may still be writing the summary, and no rank should tear the process group
            # down while another is still inside it.
            dist.barrier()
        return EXIT_OK, summary
    except utils.DiskFullError as error:
        logger.error("%s. Then resume with the same command plus --resume auto", error)
        return EXIT_FAILED, None
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _refuse_before_work(config: Config, check: Callable[[Config], None] = guards.check_training_run) -> int | None:
    """The exit code when the run must not start (``guards.check_training_run``: an unusable folder, a run that
    would be overwritten, a --resume checkpoint that does not fit), after logging why in one line; None to go on.
    Runs on every rank before any of them writes, so all of them stop together."""
    try:
        check(config)
    except (guards.RunGuardError, CheckpointError) as error:
        utils.setup_logging(None)  # the console only: nothing may be written into a folder that was refused
        logger.error("%s", error)
        return EXIT_USAGE if isinstance(error, guards.RunGuardError) else EXIT_FAILED
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, warnings = build_config(argv)
    except ConfigError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if config.test:
        return run_self_test(config, run_training)
    if config.data.folds_dir is not None:
        refusal = _refuse_before_work(config, guards.check_folders)  # crossval writes into --output_dir first
        if refusal is not None:
            return refusal
        code, _ = run_cross_validation(config, warnings, run_training)
        return code
    code, _ = run_training(config, warnings)
    return code


if __name__ == "__main__":
    sys.exit(main())
