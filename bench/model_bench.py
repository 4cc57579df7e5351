"""Time one training step (forward + backward) of a SamMed3D build and report its peak memory.

    python bench/model_bench.py                                  # sam_med3d_turbo, batch 1, one click, fp32
    python bench/model_bench.py --amp bf16 --checkpointing --repeats 5
    python bench/model_bench.py --model tiny --batch_size 2

Runs on CUDA when available, else the CPU (``--device`` overrides). Random weights (speed does not depend on
them), a random volume of the model's input size and one positive click per sample at the centre. Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU and the process's resident set size on the CPU (psutil, sampled every
few milliseconds during the timed steps). Timings are for reports only; no test asserts them.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules are flat files at the repository root
from memory import RssSampler  # noqa: E402
from model import MODEL_REGISTRY  # noqa: E402

logger = logging.getLogger("model_bench")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="sam_med3d_turbo", choices=("sam_med3d_turbo", "tiny"),
                        help="registry name of the build to time")
    parser.add_argument("--batch_size", type=int, default=1, help="volumes per step")
    parser.add_argument("--amp", default="none", choices=tuple(AMP_DTYPES), help="autocast dtype")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of encoder blocks")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, kernel choice)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="where to run")
    parser.add_argument("--visual_tokens", type=int, default=256, help="representation-head token width")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch_size and --repeats must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    amp_dtype = AMP_DTYPES[args.amp]
    torch.manual_seed(0)
    model = MODEL_REGISTRY[args.model](visual_tokens=args.visual_tokens).to(device).train()
    model.set_gradient_checkpointing(args.checkpointing)
    s, b = model.img_size, args.batch_size
    images = torch.randn(b, 1, s, s, s, device=device)
    points = torch.full((b, 1, 3), s / 2, device=device)
    labels = torch.ones(b, 1, dtype=torch.long, device=device)
    logger.info("%s on %s: batch %d, %d³ input, amp %s, checkpointing %s, %d CPU threads", args.model, device, b,
                s, args.amp, args.checkpointing, torch.get_num_threads())

    def step() -> None:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(images, points, labels)
            loss = out["masks"].float().sigmoid().mean() + out["ich_logit"].float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()  # time the kernels, not their launch

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline_rss = psutil.Process().memory_info().rss
    times = []
    with RssSampler() as rss:
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        memory = f"peak GPU memory allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    else:
        memory = (f"peak RSS {rss.peak / 2**30:.2f} GiB (before the timed steps {baseline_rss / 2**30:.2f} GiB)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model} forward+backward, batch {b}, {s}³, one click, amp {args.amp}, checkpointing "
          f"{'on' if args.checkpointing else 'off'}, {name}: median {statistics.median(times):.3f} s, "
          f"min {min(times):.3f} s over {args.repeats} steps; {memory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
