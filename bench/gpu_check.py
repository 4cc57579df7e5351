"""The GPU check: turbo fine-tuning on the real data path, measured in one command within a time budget.

    python bench/gpu_check.py                       # CUDA: the full check, table in bench/results/gpu_check_<gpu>.md
    bash bench/gpu_check.sh                         # the same on a bare GPU image (installs carried MONAI/nibabel)
    python bench/gpu_check.py --work_dir /tmp/gc    # keep the generated cohort there: a rerun skips generation
    python bench/gpu_check.py --smoke               # reduced mode for a CPU (tests): tiny model, 3 small scans

Full mode: a synthetic cohort of 75 training scans (+3 for validation) of 512×512×30 voxels at 0.45×0.45×5 mm is
generated (part of the time budget), validated and cached exactly as train.py does it; ``sam_med3d_turbo`` is
built with random weights (``--pretrained_checkpoint none``: speed does not depend on the weights, and the check
must not need the published file). Measured, each with a fresh model and Trainer (``bench/harness.py``, shared with
``bench/train_bench.py``): s/step, crops/s, data-wait fraction and peak GPU memory at batch 1/2/8 × bf16 on/off ×
gradient checkpointing on/off; ``--compile`` on at batch 2 with bf16 (compare with its compile-off row); and one
full epoch over the 75 scans at batch 2 with bf16, followed by validation of the validation scans (whole volumes,
Dice after 1/3/5 simulated clicks, as every epoch of train.py validates).

Measurements run in order of importance (batch 2 first, then the full epoch, batch 1, batch 8, compile) while the
time budget (``--budget_s``, counted from the start, generation included) allows: a measurement starts only when
the time measured so far for one like it still fits. The budget (420 s) is sized for one H100 or H200 in under 8
minutes: on an H200 every row but compile took 2 min 51 s (cohort generation 53 s of it,
``bench/results/gpu_check_nvidia_h200.md``, run with ``--budget_s 225``, which left no room for the compile row's
150 s estimate; the compile row has not been measured yet). The table is rewritten after every measurement, so a run stopped at a time limit still
leaves one, with the rows it did not reach marked ``pending``. Progress goes to stderr with timestamps.

``--smoke``: the same code on a CPU in well under a minute: the tiny model, 3 training scans (+1 validation) of
96×96×12, 1 warm-up and 1 timed micro-batch per setting, batch 1 and 2; bf16 and compile rows are written as
``n/a (CPU)`` (the trainer refuses CPU autocast; compiling for a CPU says nothing about a GPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import platform
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
import utils  # noqa: E402
from bench.harness import (EPOCH_SCANS, LoaderCache, cohort_flags, device_slug, head_ct_spacing,  # noqa: E402
                           measure_training, prepare_cohort, release_memory, setting_flags)
from config import build_config  # noqa: E402
from reporting import format_duration  # noqa: E402

logger = logging.getLogger("gpu_check")


@dataclasses.dataclass(frozen=True)
class Mode:
    """Sizes of one check mode."""

    model: str
    n_train: int
    n_val: int
    shape: tuple[int, int, int]
    batch_sizes: tuple[int, ...]
    steps: int
    warmup_steps: int
    compile_warmup_steps: int  # compiling happens in the warm-up; mixed prompts give two graphs (0 and N clicks)
    budget_s: float


FULL = Mode(model="sam_med3d_turbo", n_train=EPOCH_SCANS, n_val=3, shape=(512, 512, 30), batch_sizes=(1, 2, 8),
            steps=8, warmup_steps=2, compile_warmup_steps=4, budget_s=420.0)
SMOKE = Mode(model="tiny", n_train=3, n_val=1, shape=(96, 96, 12), batch_sizes=(1, 2), steps=1, warmup_steps=1,
             compile_warmup_steps=1, budget_s=600.0)
EPOCH_BATCH = 2  # train.py's default --batch_size
# Seconds assumed for a compile row before any has run: Inductor compiles the ViT-B forward and backward.
COMPILE_ESTIMATE_S = 150.0
NOT_ON_CPU = "n/a (CPU)"
PENDING = "pending"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One measurement: ``kind`` "steps" (a few timed micro-batches) or "epoch" (a whole epoch + validation)."""

    kind: str
    batch: int
    bf16: bool
    checkpointing: bool
    compile: bool = False

    def describe(self) -> str:
        what = "full epoch" if self.kind == "epoch" else "steps"
        return (f"{what}, batch {self.batch}, bf16 {_on(self.bf16)}, checkpointing {_on(self.checkpointing)}, "
                f"compile {_on(self.compile)}")


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def plan(batch_sizes: Sequence[int], gpu: bool) -> tuple[list[Setting], list[Setting]]:
    """(settings in table order, the same settings in measuring order). Table order: every batch size × bf16 ×
    checkpointing, then compile on, then the full epoch (bf16 on a GPU). Measuring order puts what matters most
    first, so a tight budget loses the least: batch 2 (train.py's default), the full epoch, the other batch sizes
    by size, compile last (its compile time is the least predictable)."""
    epoch_batch = EPOCH_BATCH if EPOCH_BATCH in batch_sizes else batch_sizes[0]
    grid = [Setting("steps", b, bf16, ckpt) for b in batch_sizes for bf16 in (False, True) for ckpt in (False, True)]
    compiled = Setting("steps", epoch_batch, bf16=True, checkpointing=False, compile=True)
    epoch = Setting("epoch", epoch_batch, bf16=gpu, checkpointing=False)
    table = [*grid, compiled, epoch]
    first = [s for s in grid if s.batch == epoch_batch]
    rest = sorted((s for s in grid if s.batch != epoch_batch), key=lambda s: s.batch)
    return table, [*first, epoch, *rest, compiled]


def applicable(setting: Setting, device: torch.device) -> bool:
    """bf16 and compile are GPU settings: the trainer runs fp32 on a CPU, and a CPU compile says nothing here."""
    return device.type == "cuda" or not (setting.bf16 or setting.compile)


def estimate_seconds(setting: Setting, results: dict[Setting, dict[str, Any]], n_train: int) -> float:
    """Expected wall time of ``setting`` from the measurements so far (0 when nothing comparable ran yet): the
    slowest finished row of the same batch size (the next one is alike), or for the full epoch the matching row's
    s/step over the epoch's steps, twice for validation and overhead; compile rows a fixed guess."""
    done = {s: r for s, r in results.items() if "s_per_step" in r}
    if setting.compile:
        return COMPILE_ESTIMATE_S
    if setting.kind == "epoch":
        same = [r for s, r in done.items() if s.kind == "steps" and s.batch == setting.batch and s.bf16 == setting.bf16
                and s.checkpointing == setting.checkpointing and not s.compile]
        if not same:
            return 0.0
        return 2.0 * same[0]["s_per_step"] * math.ceil(n_train / setting.batch)
    same_batch = [r["wall_s"] for s, r in done.items() if s.batch == setting.batch and s.kind == "steps"]
    return max(same_batch, default=0.0)


def run_measurement(setting: Setting, flags: list[str], cache: LoaderCache, device: torch.device,
                    mode: Mode) -> dict[str, Any]:
    """One row: its figures, or ``{"status": ...}`` for out-of-memory and failures (logged with the traceback:
    one broken setting, e.g. a compiler error on this torch release, must not cost the rest of the table)."""
    config, _ = build_config([*flags, *setting_flags(setting.batch, setting.bf16, setting.checkpointing,
                                                     setting.compile)])
    warmup = mode.compile_warmup_steps if setting.compile else mode.warmup_steps
    started = time.perf_counter()
    try:
        if setting.kind == "epoch":
            row = measure_training(config, cache, device, None, warmup, validate=True)
        else:
            row = measure_training(config, cache, device, mode.steps, warmup)
    except torch.OutOfMemoryError:
        release_memory(device)
        return {"status": "out of memory"}
    except RuntimeError as error:
        logger.exception("%s failed", setting.describe())
        release_memory(device)
        return {"status": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    row["wall_s"] = time.perf_counter() - started
    row["status"] = "done"
    return row


# ------------------------------------------------------------------------------------------------------ report

COLUMNS = ("measurement", "batch", "bf16", "grad ckpt", "compile", "steps", "s/step", "crops/s", "data wait",
           "peak memory", "warm-up", f"epoch of {EPOCH_SCANS} scans")


def _precision(row: dict[str, Any], setting: Setting) -> str:
    amp = row.get("amp")
    return {"bfloat16": "on", "float16": "fp16", "off": "off"}.get(amp, _on(setting.bf16))


def _memory_cell(row: dict[str, Any]) -> str:
    if row.get("peak_gpu_gib") is not None:
        return f"{row['peak_gpu_gib']:.2f} of {row['gpu_total_gib']:.1f} GiB GPU"
    return f"{row['peak_rss_gib']:.2f} GiB RSS"


def _epoch_cell(row: dict[str, Any], setting: Setting) -> str:
    if setting.kind == "epoch":
        val = (f" + validation {format_duration(row['val_s'])} ({row['val_scans']} scan(s), "
               f"{row['val_s'] / max(row['val_scans'], 1):.1f} s each)" if row.get("val_s") is not None else "")
        return f"measured {format_duration(row['epoch_time_s'])} training{val}"
    return f"≈ {format_duration(EPOCH_SCANS / row['crops_per_s'])} (training only)"


def format_row(setting: Setting, row: dict[str, Any]) -> str:
    """One Markdown table row; settings without figures carry their status in every measured column."""
    what = "full epoch" if setting.kind == "epoch" else "compiled steps" if setting.compile else "steps"
    head = [what, str(setting.batch), _precision(row, setting), _on(setting.checkpointing), _on(setting.compile)]
    if row.get("status") != "done":
        cells = head + [row.get("status", PENDING)] * (len(COLUMNS) - len(head))
    else:
        cells = head + [str(row["steps"]), f"{row['s_per_step']:.3f}", f"{row['crops_per_s']:.2f}",
                        f"{100 * row['data_wait']:.0f}%", _memory_cell(row), f"{row['warmup_s']:.1f} s",
                        _epoch_cell(row, setting) + (" (OOM skips)" if row["oom"] else "")]
    return "| " + " | ".join(cells) + " |"


def format_table(table_order: Sequence[Setting], results: dict[Setting, dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [format_row(s, results.get(s, {"status": PENDING})) for s in table_order]
    return "\n".join(lines)


def machine_line(device: torch.device) -> str:
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.1f} GiB), CUDA {torch.version.cuda}, cuDNN "
                f"{torch.backends.cudnn.version()}, {versions}, {utils.usable_cpu_count()} CPU cores")
    return f"CPU only ({utils.usable_cpu_count()} cores, {torch.get_num_threads()} torch thread(s)), {versions}"


def render(context: dict[str, Any], table_order: Sequence[Setting], results: dict[Setting, dict[str, Any]]) -> str:
    finished = sum(1 for s in table_order if results.get(s, {}).get("status", PENDING) != PENDING)
    status = ("complete" if finished == len(table_order) else
              f"incomplete: {finished} of {len(table_order)} rows reached; 'pending' rows were still to run when "
              "this file was last written (the run was stopped or is still going)")
    mode: Mode = context["mode"]
    cohort = context.get("cohort_note", "being prepared")
    device: torch.device = context["device"]
    return (
        f"# GPU check: {mode.model} fine-tuning on {context['machine']}\n\n"
        f"Status: {status}. Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{format_duration(time.perf_counter() - context['started'])} after the start (budget "
        f"{format_duration(context['budget_s'])}).\n\n"
        f"Command: `{context['command']}`\n\n"
        f"Cohort: {mode.n_train} training + {mode.n_val} validation synthetic scans of "
        f"{'×'.join(map(str, mode.shape))} voxels at {'×'.join(f'{s:g}' for s in context['spacing'])} mm ({cohort}); "
        f"preprocessed to {context.get('target_spacing', '1.5×1.5×1.5')} mm and cached in RAM, real crops and "
        f"augmentation ({'on the GPU, ThreadDataLoader' if device.type == 'cuda' else 'DataLoader workers'}). "
        f"Model: {mode.model} with random weights (`--pretrained_checkpoint none`; speed does not depend on the "
        f"weights), prompt mode mixed, AdamW, no gradient accumulation.\n\n"
        f"Each 'steps' row: a fresh model and Trainer, {mode.warmup_steps} untimed warm-up micro-batch(es) "
        f"({mode.compile_warmup_steps} with compile: the warm-up column includes compiling), then {mode.steps} "
        f"timed; s/step and crops/s are wall clock including the data wait; peak memory is "
        f"`torch.cuda.max_memory_allocated` against the card's total on a GPU, the process's peak RSS on a CPU. "
        f"The epoch estimate of a 'steps' row is {EPOCH_SCANS} / crops_per_s (training only); the 'full epoch' "
        f"row trains over all {mode.n_train} scans and then validates the {mode.n_val} validation scans "
        f"(sliding window, Dice after 1/3/5 simulated clicks).\n\n"
        f"{format_table(table_order, results)}\n")


# ------------------------------------------------------------------------------------------------------ command

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="reduced mode for a CPU: tiny model, 3 small scans, 1 step per setting")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="where to train")
    parser.add_argument("--budget_s", type=float, default=None,
                        help=f"seconds from the start after which no new measurement begins (default "
                             f"{FULL.budget_s:g}, smoke {SMOKE.budget_s:g})")
    parser.add_argument("--work_dir", default=None,
                        help="folder for the cohort and its cache, reused by a rerun (default: a temporary folder, "
                             "removed afterwards)")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: automatic)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None,
                        help="Markdown output (default bench/results/gpu_check_<gpu>.md, _smoke added in --smoke)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --smoke --device cpu for the reduced mode)")
    if args.device != "cuda" and not torch.cuda.is_available() and not args.smoke:
        parser.error("no CUDA device is available: the full check needs a GPU (turbo on a CPU takes minutes per "
                     "epoch of 8 steps); run the reduced mode with --smoke")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    utils.setup_logging(None)
    device = utils.resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    mode = SMOKE if args.smoke else FULL
    budget_s = args.budget_s if args.budget_s is not None else mode.budget_s
    spacing = head_ct_spacing(mode.shape)
    out = Path(args.out) if args.out else (ROOT / "bench" / "results" /
                                           f"gpu_check_{device_slug(device)}{'_smoke' if args.smoke else ''}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    table_order, measure_order = plan(mode.batch_sizes, gpu=device.type == "cuda")
    results: dict[Setting, dict[str, Any]] = {s: {"status": NOT_ON_CPU} for s in table_order
                                              if not applicable(s, device)}
    context: dict[str, Any] = {"mode": mode, "device": device, "machine": machine_line(device), "started": started,
                               "budget_s": budget_s, "spacing": spacing,
                               "command": " ".join(["python bench/gpu_check.py", *argv])}

    def write() -> None:
        utils.atomic_write_text(out, render(context, table_order, results))

    logger.info("GPU check on %s; %d measurements; budget %s; table: %s", context["machine"],
                sum(applicable(s, device) for s in table_order), format_duration(budget_s), out)
    write()
    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="gpu_check_")) if temporary else Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        cohort, generation_s = prepare_cohort(work_dir, mode.n_train, mode.n_val, mode.shape, spacing)
        workers = ["--num_workers", str(args.num_workers)] if args.num_workers is not None else []
        flags = [*cohort_flags(cohort, work_dir, mode.model, device), "--pretrained_checkpoint", "none", *workers]
        config, _ = build_config(flags)
        validation_started = time.perf_counter()
        data = dataloader.validate_cohort(config.data)
        context["cohort_note"] = (f"{'reused' if generation_s is None else f'generated in {generation_s:.0f} s'}, "
                                  f"validated in {time.perf_counter() - validation_started:.0f} s")
        context["target_spacing"] = "×".join(f"{s:g}" for s in config.data.target_spacing)
        write()
        cache = LoaderCache(data, device)
        for index, setting in enumerate(s for s in measure_order if applicable(s, device)):
            elapsed = time.perf_counter() - started
            expected = estimate_seconds(setting, results, len(data.train))
            if elapsed + expected > budget_s:
                logger.warning("skipping %s: %s elapsed, about %s needed, budget %s", setting.describe(),
                               format_duration(elapsed), format_duration(expected), format_duration(budget_s))
                results[setting] = {"status": "skipped: time budget"}
                write()
                continue
            logger.info("[%d] %s (%s elapsed)", index + 1, setting.describe(), format_duration(elapsed))
            results[setting] = run_measurement(setting, flags, cache, device, mode)
            logger.info("[%d] %s", index + 1, format_row(setting, results[setting]))
            write()
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    report = render(context, table_order, results)
    utils.atomic_write_text(out, report)
    print(report, flush=True)
    logger.info("written to %s in %s", out, format_duration(time.perf_counter() - started))
    return 1 if any(r.get("status", "").startswith("failed") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
