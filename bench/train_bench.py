"""Training throughput on the real data path: steps/s, crops/s, data-wait fraction and peak memory.

    python bench/train_bench.py --model tiny --batch_sizes 1 2 8 --steps 5
    python bench/train_bench.py --model sam_med3d_turbo --batch_sizes 1 2 8 --amp off on --checkpointing off on
    python bench/train_bench.py --model tiny --shape 256 256 30 -- --prompt_mode none   # after --: train.py flags

A synthetic cohort of ``--n_scans`` scans (default 512×512×30 voxels at 0.45×0.45×5 mm, a typical head CT) is
generated, validated and cached exactly as train.py does it (``validate_cohort``, ``build_dataloaders`` with the
RAM cache and the automatic worker count), so the crops, augmentations and DataLoader workers are the real ones.
For every combination of batch size × AMP × gradient checkpointing a fresh model and Trainer are built (the
loaders once per batch size; ``bench/harness.py`` holds this machinery, shared with ``bench/gpu_check.py``); one
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
import itertools
import logging
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
from bench.harness import (EPOCH_SCANS, LoaderCache, cohort_flags, device_description, device_slug,  # noqa: E402
                           head_ct_spacing, measure_training, merge_section, prepare_cohort, release_memory,
                           setting_flags)
from config import build_config  # noqa: E402
from reporting import format_duration  # noqa: E402

logger = logging.getLogger("train_bench")


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
    args.spacing = tuple(args.spacing or head_ct_spacing(args.shape))
    if args.n_scans < args.steps * max(args.batch_sizes):
        parser.error(f"--n_scans {args.n_scans} is too small: {args.steps} steps of batch {max(args.batch_sizes)} "
                     f"need {args.steps * max(args.batch_sizes)} scans (one crop per scan per epoch)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args, train_flags


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
            f"{format_duration(epoch_s)}{' (OOM skips)' if r['oom'] else ''} |")
    return "\n".join(lines)


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
        # One validation scan: build_dataloaders wants a val split, the bench never iterates it.
        cohort, _ = prepare_cohort(work_dir, args.n_scans, 1, args.shape, args.spacing)
        workers = ["--num_workers", str(args.num_workers)] if args.num_workers is not None else []
        flags = [*cohort_flags(cohort, work_dir, args.model, device), *workers, *train_flags]
        config, _ = build_config(flags)
        started = time.perf_counter()
        data = dataloader.validate_cohort(config.data)
        logger.info("validated the cohort in %.1f s", time.perf_counter() - started)

        cache = LoaderCache(data, device)
        rows: list[dict[str, Any]] = []
        for batch, amp, checkpointing in itertools.product(args.batch_sizes, args.amp, args.checkpointing):
            if amp == "on" and device.type == "cpu":
                logger.warning("skipping AMP rows on the CPU: the trainer runs fp32 there")
                continue
            row_config, _ = build_config([*flags, *setting_flags(batch, amp == "on", checkpointing == "on")])
            logger.info("timing %s, batch %d, AMP %s, checkpointing %s", args.model, batch, amp, checkpointing)
            try:
                rows.append(measure_training(row_config, cache, device, args.steps, args.warmup_steps))
            except torch.OutOfMemoryError:
                release_memory(device)
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
