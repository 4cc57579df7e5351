"""Training throughput on the real data path: steps/s, crops/s, data-wait fraction and peak memory.

    python bench/train_bench.py --model tiny --batch_sizes 1 2 8 --steps 5
    python bench/train_bench.py --model sam_med3d_turbo --batch_sizes 1 2 8 --amp off on --checkpointing off on
    python bench/train_bench.py --model tiny --shape 256 256 30 -- --prompt_mode none   # after --: train.py flags

A synthetic cohort of ``--n_scans`` scans (default 512×512×30 voxels at 0.45×0.45×5 mm, a typical head CT) is
generated, validated and cached exactly as train.py does it (``validate_cohort``, ``build_dataloaders`` with the
RAM cache and the automatic worker count), so the crops, augmentations and DataLoader workers are the real ones.
For every combination of batch size × AMP × gradient checkpointing a fresh model and Trainer are built; one
untimed warm-up epoch of ``--warmup_steps`` micro-batches (allocator, cuDNN autotuning, worker start) is followed
by a timed epoch of ``--steps`` micro-batches through ``Trainer.train_epoch``, which measures the data wait (time
blocked on the loader) and the compute time per epoch.

Reported per row: seconds per step and steps/s (wall clock including data wait), crops/s, the data-wait fraction,
peak GPU memory (``torch.cuda.max_memory_allocated``) or, on the CPU, the training process's peak RSS (sampled
every 2 ms) and its DataLoader workers' RSS, and the estimated time of one training epoch over a 75-scan cohort
(one crop per scan per epoch: 75 / crops_per_s; validation not included). Timings are for reports only.
AMP is skipped on the CPU (the trainer refuses CPU autocast; see ``inference.choose_amp_dtype``).

The Markdown table goes to ``--out`` (default ``bench/results/train_bench_<device>.md``) and to stdout.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import logging
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules are flat files at the repository root
import dataloader  # noqa: E402
import tracking  # noqa: E402
import utils  # noqa: E402
from config import build_config, replace_section  # noqa: E402
from memory import RssSampler  # noqa: E402
from model import build_model  # noqa: E402
from synthetic import SyntheticCohort, generate_cohort  # noqa: E402
from trainer import Trainer  # noqa: E402

logger = logging.getLogger("train_bench")
EPOCH_SCANS = 75  # the cohort size the per-epoch estimate is quoted for
FIELD_OF_VIEW_MM = 230.4  # in-plane extent of a typical head CT (512 voxels × 0.45 mm)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Bench flags, and the train.py flags given after ``--`` (passed to ``config.build_config`` unchanged)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    train_flags: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, train_flags = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=("tiny", "sam_med3d_turbo"), help="registry name")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 8], help="micro-batch sizes to time")
    parser.add_argument("--amp", nargs="+", default=["off"], choices=("off", "on"),
                        help="mixed precision settings to time (bf16, or fp16 on pre-Ampere GPUs)")
    parser.add_argument("--checkpointing", nargs="+", default=["off"], choices=("off", "on"),
                        help="gradient checkpointing settings to time")
    parser.add_argument("--steps", type=int, default=5, help="timed micro-batches per row")
    parser.add_argument("--warmup_steps", type=int, default=1, help="untimed micro-batches before each row")
    parser.add_argument("--n_scans", type=int, default=None,
                        help="training scans in the generated cohort (default: steps × the largest batch, so every "
                             "timed step is a fresh crop of a different scan within one epoch)")
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 30), metavar="N",
                        help="voxels per generated scan (array axes 0, 1, 2)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar="MM",
                        help="voxel spacing of the generated scans in mm (default: 5 mm slices and the in-plane "
                             "spacing that keeps a 230 mm field of view, 0.45 mm at 512 voxels)")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: automatic)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="where to train")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the training process (default: torch's choice). On a shared "
                             "machine 1 can be much faster: OpenMP threads waiting for a descheduled peer spin")
    parser.add_argument("--work_dir", default=None,
                        help="folder for the cohort and cache, reused when it already holds a cohort of this "
                             "size (default: a temporary folder, removed afterwards)")
    parser.add_argument("--out", default=None, help="Markdown output (default bench/results/train_bench_<device>.md)")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.warmup_steps < 0:
        parser.error("--batch_sizes and --steps must be >= 1, --warmup_steps >= 0")
    args.n_scans = args.n_scans or args.steps * max(args.batch_sizes)
    # A smaller grid keeps the head's physical size (the preprocessed volume, hence the crops, stay realistic).
    args.spacing = tuple(args.spacing or (FIELD_OF_VIEW_MM / args.shape[0], FIELD_OF_VIEW_MM / args.shape[1], 5.0))
    if args.n_scans < args.steps * max(args.batch_sizes):
        parser.error(f"--n_scans {args.n_scans} is too small: {args.steps} steps of batch {max(args.batch_sizes)} "
                     f"need {args.steps * max(args.batch_sizes)} scans (one crop per scan per epoch)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args, train_flags


def device_slug(device: torch.device) -> str:
    """A file-name-safe device label: ``cpu`` or the GPU's name (``nvidia_h100_80gb_hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    threads = torch.get_num_threads()
    return f"CPU, {threads} torch thread{'s' if threads != 1 else ''}"


def merge_section(document: str, title: str, section: str) -> str:
    """``document`` with the section headed ``title`` replaced by ``section`` (appended when absent), so one
    results file collects a table per model and device setting and a rerun updates its own table only."""
    sections = re.split(r"(?m)^(?=## )", document)
    kept = [part for part in sections if part.strip() and part.splitlines()[0] != title]
    return "\n".join(part.rstrip("\n") + "\n" for part in [*kept, section])


def prepare_cohort(args: argparse.Namespace, work_dir: Path) -> Any:
    """Generate the synthetic cohort once; a work folder that already holds one of the same size is reused."""
    root = work_dir / f"cohort_{args.n_scans}x{'x'.join(map(str, args.shape))}"
    if (root / "train.csv").is_file() and (root / "val.csv").is_file():
        logger.info("reusing the cohort in %s", root)
        return SyntheticCohort(root / "train.csv", root / "val.csv", root / "masks", root)
    started = time.perf_counter()
    # One validation scan: build_dataloaders wants a val split, the bench never iterates it.
    cohort = generate_cohort(root, n_train=args.n_scans, n_val=1, shape=args.shape, spacing=args.spacing, seed=0)
    logger.info("generated %d scans of %s in %.1f s", args.n_scans + 1, "×".join(map(str, args.shape)),
                time.perf_counter() - started)
    return cohort


def base_flags(args: argparse.Namespace, cohort: Any, work_dir: Path, device: torch.device) -> list[str]:
    return ["--train_csv", str(cohort.train_csv), "--val_csv", str(cohort.val_csv), "--mask_dir",
            str(cohort.mask_dir), "--cache_dir", str(work_dir / "cache"), "--output_dir", str(work_dir / "run"),
            "--model", args.model, "--device", device.type, "--gradient_accumulation_steps", "1",
            *(["--num_workers", str(args.num_workers)] if args.num_workers is not None else [])]


def bench_row(flags: list[str], data: Any, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration (warm-up epoch, then the timed epoch); returns the row's figures."""
    config, _ = build_config([*flags, "--max_steps_per_epoch", str(max(args.warmup_steps, 1))])
    utils.seed_everything(config.train.seed)
    model = build_model(config.model)
    preprocessing = dataloader.Preprocessing.from_config(config.data, model.img_size)
    train_loader, val_loader = dataloader.build_dataloaders(
        config.data, preprocessing, data, batch_size=config.train.batch_size, device=device,
        seed=config.train.seed)
    assert len(train_loader) >= args.steps, "parse_args sizes the cohort for every batch size"
    trainer = Trainer(config, model, train_loader, val_loader, device, tracking.NullTracker(),
                      Path(config.train.output_dir), set_loader_epoch=dataloader.set_epoch,
                      preprocessing=preprocessing)
    if args.warmup_steps:
        trainer.on_epoch_start(0)
        trainer.train_epoch(0)
    # The timed epoch: the trainer reads the step cap from its config at the start of each epoch.
    trainer.config = replace_section(config, "train", max_steps_per_epoch=args.steps)
    trainer.on_epoch_start(1)  # also resets the GPU peak-memory counters
    with RssSampler() as rss:
        stats = trainer.train_epoch(1)
    memory = trainer.memory.snapshot()
    steps, batch = args.steps, config.train.batch_size
    row = {
        "batch": batch, "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "off",
        "checkpointing": "on" if config.model.use_gradient_checkpointing else "off", "steps": steps,
        "s_per_step": stats["epoch_time_s"] / steps, "steps_per_s": steps / stats["epoch_time_s"],
        "crops_per_s": steps * batch / stats["epoch_time_s"], "data_wait": stats["data_wait_fraction"],
        "compute_s_per_step": stats["compute_time_s"] / steps,
        "peak_gpu_gib": memory["peak_gpu_allocated_gb"], "peak_rss_gib": rss.peak / 2**30,
        "workers_rss_gib": memory["peak_children_rss_gb"], "workers": train_loader.num_workers,
        "oom": stats["oom_skipped"] > 0,
    }
    del trainer, model, train_loader, val_loader
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def format_table(rows: list[dict[str, Any]], model: str) -> str:
    head = ("| model | batch | AMP | grad ckpt | s/step | steps/s | crops/s | data wait | compute s/step | "
            f"peak GPU alloc GiB | peak RSS GiB (workers) | est. epoch, {EPOCH_SCANS} scans |")
    columns = head.count("|") - 1
    lines = [head, "|" + "---|" * columns]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {model} | {r['batch']} | {r['amp']} | {r['checkpointing']} | {r['error']} |"
                         + " |" * (columns - 5))
            continue
        gpu = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "n/a"
        epoch_s = EPOCH_SCANS / r["crops_per_s"]
        lines.append(
            f"| {model} | {r['batch']} | {r['amp']} | {r['checkpointing']} | {r['s_per_step']:.3f} | "
            f"{r['steps_per_s']:.2f} | {r['crops_per_s']:.2f} | {100 * r['data_wait']:.0f}% | "
            f"{r['compute_s_per_step']:.3f} | {gpu} | {r['peak_rss_gib']:.2f} ({r['workers_rss_gib']:.2f}) | "
            f"{_duration(epoch_s)}{' (OOM skips)' if r['oom'] else ''} |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def main(argv: Sequence[str] | None = None) -> int:
    args, train_flags = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="train_bench_")) if temporary else Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        cohort = prepare_cohort(args, work_dir)
        flags = base_flags(args, cohort, work_dir, device) + train_flags
        config, _ = build_config(flags)
        started = time.perf_counter()
        data = dataloader.validate_cohort(config.data)
        logger.info("validated the cohort in %.1f s", time.perf_counter() - started)

        rows: list[dict[str, Any]] = []
        for batch, amp, checkpointing in itertools.product(args.batch_sizes, args.amp, args.checkpointing):
            if amp == "on" and device.type == "cpu":
                logger.warning("skipping AMP rows on the CPU: the trainer runs fp32 there")
                continue
            row_flags = [*flags, "--batch_size", str(batch),
                         "--use_mixed_precision" if amp == "on" else "--no-use_mixed_precision",
                         "--use_gradient_checkpointing" if checkpointing == "on"
                         else "--no-use_gradient_checkpointing"]
            logger.info("timing %s, batch %d, AMP %s, checkpointing %s", args.model, batch, amp, checkpointing)
            try:
                rows.append(bench_row(row_flags, data, device, args))
            except torch.OutOfMemoryError:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append({"batch": batch, "amp": amp, "checkpointing": checkpointing, "error": "out of memory"})
            logger.info("row: %s", rows[-1])

        table = format_table(rows, args.model)
        title = f"## Training throughput: {args.model} on {device_description(device)}"
        header = (
            f"{title}\n\n"
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}. Command: "
            f"`python bench/train_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
            f"Real data path: {args.n_scans} synthetic scans of {'×'.join(map(str, args.shape))} voxels at "
            f"{'×'.join(f'{s:g}' for s in args.spacing)} mm, preprocessed to "
            f"{'×'.join(f'{s:g}' for s in config.data.target_spacing)} mm and cached in RAM; "
            f"{rows[0].get('workers', '?') if rows else '?'} DataLoader worker(s); prompt mode "
            f"{config.train.prompt_mode}; {args.steps} timed micro-batches per row after {args.warmup_steps} "
            f"warm-up. s/step and crops/s are wall clock including the data wait; the epoch estimate is "
            f"{EPOCH_SCANS} / crops_per_s (one crop per scan, no validation).\n\n")
        report = header + table + "\n"
        out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"train_bench_{device_slug(device)}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(merge_section(out.read_text(encoding="utf-8") if out.is_file() else "", title, report),
                       encoding="utf-8")
        print(report)
        print(f"written to {out}")
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
