"""The three CPU kernels this project replaced, timed against what they replaced, on the machine at hand.

    OMP_NUM_THREADS=2 python bench/op_bench.py                      # writes bench/results/op_bench_cpu.md
    OMP_NUM_THREADS=2 python bench/op_bench.py --repeats 40 --out /tmp/op_bench.md

- **Mask upsampling** (forward + backward, batch 2): ``F.interpolate(..., mode="trilinear")`` against
  ``modeling.common.upsample_trilinear`` for the tiny build's 32³ -> 64³ and turbo's 32³ -> 128³ masks.
- **Refiner on one volume** (forward, no gradient; how validation's and predict.py's clicks call it): the tiny
  build's refiner body on a batch of one, which PyTorch sends to its slow reference convolution, against
  ``MaskRefiner3D.forward`` (a batch of two copies through oneDNN).
- **AdamW step** over the tiny build's trainable parameters with random gradients: the default per-tensor loop
  against ``fused=True`` (what the trainer builds on CPUs and GPUs).

Each row is the median of ``--repeats`` timed calls after 3 untimed ones. Timings are for reports only.
"""
from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules are flat files at the repository root
from model import build_tiny  # noqa: E402
import modeling.refiner as refiner_module  # noqa: E402
from modeling.common import upsample_trilinear  # noqa: E402

logger = logging.getLogger("op_bench")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def median_ms(call: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def upsampling_rows(repeats: int) -> list[tuple[str, float, float]]:
    rows = []
    for low, size, build in ((32, 64, "tiny"), (32, 128, "turbo")):
        logits = torch.randn(2, 1, low, low, low, requires_grad=True)
        weights = torch.randn(2, 1, size, size, size)

        def reference() -> None:
            (F.interpolate(logits, size=(size,) * 3, mode="trilinear", align_corners=False) * weights).sum().backward()

        def ours() -> None:
            (upsample_trilinear(logits, size) * weights).sum().backward()

        rows.append((f"mask upsampling {low}³ -> {size}³ ({build}), forward + backward, batch 2",
                     median_ms(reference, repeats), median_ms(ours, repeats)))
    return rows


def refiner_row(repeats: int) -> tuple[str, float, float]:
    refiner = build_tiny().refiner
    image, coarse = torch.randn(1, 1, 64, 64, 64), torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        # The same forward with its two-copy path switched off: the single volume meets PyTorch's own choice.
        with mock.patch.object(refiner_module, "ONEDNN_MIN_WORK", -1):
            slow = median_ms(lambda: refiner(image, coarse), repeats)
        fast = median_ms(lambda: refiner(image, coarse), repeats)
    return "tiny refiner on one 64³ window, forward", slow, fast


def optimizer_row(repeats: int) -> tuple[str, float, float]:
    model = build_tiny()
    parameters = [p for p in model.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    per_tensor = torch.optim.AdamW(parameters, lr=1e-6)
    fused = torch.optim.AdamW(parameters, lr=1e-6, fused=True)
    return (f"AdamW step, tiny build ({len(parameters)} tensors)",
            median_ms(per_tensor.step, repeats), median_ms(fused.step, repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "op_bench_cpu.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    rows = [*upsampling_rows(args.repeats), refiner_row(args.repeats), optimizer_row(args.repeats)]
    lines = [f"# CPU kernels: before and after ({datetime.now(timezone.utc):%Y-%m-%d})", "",
             f"`OMP_NUM_THREADS={torch.get_num_threads()} python bench/op_bench.py --repeats {args.repeats}`; "
             f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}.", "",
             "| operation | before (ms) | now (ms) | speed-up |", "|---|---|---|---|"]
    lines += [f"| {name} | {before:.2f} | {now:.2f} | {before / now:.1f}× |" for name, before, now in rows]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    logger.info("%s", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
