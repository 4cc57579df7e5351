"""Shared machinery of the training benches (``bench/train_bench.py``, ``bench/gpu_check.py``).

- ``prepare_cohort``: a synthetic head-CT cohort in the user format, generated once per work folder (reused when
  the folder already holds one of the same size);
- ``LoaderCache``: the real training and validation loaders (``dataloader.build_dataloaders``: RAM cache, crops,
  augmentation, automatic worker count) built once per batch size and shared by every setting timed at that size;
- ``measure_training``: one configuration through the real ``Trainer``: an untimed warm-up epoch of a few
  micro-batches (allocator, cuDNN autotuning, ``torch.compile``, worker start), then a timed epoch
  (``Trainer.train_epoch`` measures the data wait and the compute time), optionally followed by ``validate``;
- device labels and Markdown helpers.

Timings are for reports only; no test asserts them.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the project's modules are flat files at the repository root
import dataloader  # noqa: E402
import tracking  # noqa: E402
import utils  # noqa: E402
from config import Config  # noqa: E402
from memory import RssSampler  # noqa: E402
from model import build_model  # noqa: E402
from synthetic import SyntheticCohort, generate_cohort  # noqa: E402
from trainer import Trainer  # noqa: E402
from usercheck import capped_epoch  # noqa: E402

logger = logging.getLogger("bench.harness")

EPOCH_SCANS = 75  # the cohort size per-epoch estimates are quoted for (one crop per scan per epoch)
FIELD_OF_VIEW_MM = 230.4  # in-plane extent of a typical head CT (512 voxels × 0.45 mm)
SLICE_MM = 5.0  # slice thickness of a typical head CT


def head_ct_spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    """Voxel spacing (mm) that gives a ``shape`` grid the physical size of a head CT: 5 mm slices and a 230 mm
    field of view in-plane (0.45 mm at 512 voxels). A smaller grid keeps the head's size, so the preprocessed
    volumes, and hence the crops and validation windows, stay realistic."""
    return (FIELD_OF_VIEW_MM / shape[0], FIELD_OF_VIEW_MM / shape[1], SLICE_MM)


def prepare_cohort(work_dir: Path, n_train: int, n_val: int, shape: Sequence[int],
                   spacing: Sequence[float]) -> tuple[SyntheticCohort, float | None]:
    """The cohort in ``work_dir`` (generated, or reused when a cohort of this size is already there); returns it
    with the generation time in seconds (None when reused)."""
    root = work_dir / f"cohort_{n_train}+{n_val}x{'x'.join(map(str, shape))}"
    if (root / "train.csv").is_file() and (root / "val.csv").is_file():
        logger.info("reusing the cohort in %s", root)
        return SyntheticCohort(root / "train.csv", root / "val.csv", root / "masks", root), None
    logger.info("generating %d synthetic scans of %s voxels at %s mm in %s", n_train + n_val,
                "×".join(map(str, shape)), "×".join(f"{s:g}" for s in spacing), root)
    started = time.perf_counter()
    cohort = generate_cohort(root, n_train=n_train, n_val=n_val, shape=shape, spacing=spacing, seed=0)
    elapsed = time.perf_counter() - started
    logger.info("generated %d scans in %.1f s", n_train + n_val, elapsed)
    return cohort, elapsed


def cohort_flags(cohort: SyntheticCohort, work_dir: Path, model: str, device: torch.device) -> list[str]:
    """train.py flags that point a run at ``cohort`` with its cache and outputs inside ``work_dir``."""
    return ["--train_csv", str(cohort.train_csv), "--val_csv", str(cohort.val_csv), "--mask_dir",
            str(cohort.mask_dir), "--cache_dir", str(work_dir / "cache"), "--output_dir", str(work_dir / "run"),
            "--model", model, "--device", device.type, "--gradient_accumulation_steps", "1"]


def setting_flags(batch: int, amp: bool, checkpointing: bool, compile: bool = False) -> list[str]:
    """train.py flags of one timed setting (every switch spelled out, so the defaults cannot leak in)."""
    return ["--batch_size", str(batch), "--use_mixed_precision" if amp else "--no-use_mixed_precision",
            "--use_gradient_checkpointing" if checkpointing else "--no-use_gradient_checkpointing",
            "--compile" if compile else "--no-compile"]


@dataclasses.dataclass
class Loaders:
    """The loaders of one batch size and the next epoch number to give out: the training sampler's order depends
    on the epoch and it warns when one epoch is iterated twice, so every timed pass takes a fresh number."""

    train: Any
    val: Any
    preprocessing: dataloader.Preprocessing
    next_epoch: int = 0

    def claim_epoch(self) -> int:
        epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        return epoch


class LoaderCache:
    """Real loaders over one validated cohort, built once per batch size: filling the RAM cache (and starting
    DataLoader workers) is slow and is the same for every setting timed at that batch size."""

    def __init__(self, data: dataloader.Cohort, device: torch.device):
        self.data, self.device = data, device
        self._by_batch: dict[int, Loaders] = {}

    @property
    def n_train(self) -> int:
        return len(self.data.train)

    def get(self, config: Config, input_size: int) -> Loaders:
        batch = config.train.batch_size
        if batch not in self._by_batch:
            started = time.perf_counter()
            preprocessing = dataloader.Preprocessing.from_config(config.data, input_size)
            train, val = dataloader.build_dataloaders(config.data, preprocessing, self.data, batch_size=batch,
                                                      device=self.device, seed=config.train.seed)
            logger.info("loaders for batch %d ready in %.1f s (%d worker(s))", batch, time.perf_counter() - started,
                        getattr(train, "num_workers", 0))
            self._by_batch[batch] = Loaders(train, val, preprocessing)
        return self._by_batch[batch]


def release_memory(device: torch.device) -> None:
    """Free what the last configuration left behind, so the next one's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _train_pass(trainer: Trainer, loaders: Loaders, config: Config, steps: int | None) -> dict[str, Any]:
    epoch = loaders.claim_epoch()
    return {**capped_epoch(trainer, config, epoch, steps), "epoch": epoch}


def measure_training(config: Config, cache: LoaderCache, device: torch.device, steps: int | None,
                     warmup_steps: int, validate: bool = False) -> dict[str, Any]:
    """Time ``config`` on the real data path: fresh model and Trainer, ``warmup_steps`` untimed micro-batches, then
    ``steps`` timed ones (None: a whole epoch), then with ``validate`` one ``Trainer.validate`` pass over the
    validation scans. Returns the row's figures (seconds, GiB)."""
    utils.seed_everything(config.train.seed)
    model = build_model(config.model)
    loaders = cache.get(config, int(model.img_size))
    trainer = Trainer(config, model, loaders.train, loaders.val, device, tracking.NullTracker(),
                      Path(config.train.output_dir), set_loader_epoch=dataloader.set_epoch,
                      preprocessing=loaders.preprocessing)
    warmup_s = 0.0
    if warmup_steps:
        started = time.perf_counter()
        _train_pass(trainer, loaders, config, warmup_steps)
        warmup_s = time.perf_counter() - started
    with RssSampler() as rss:
        stats = _train_pass(trainer, loaders, config, steps)
        val_s = None
        if validate:
            started = time.perf_counter()
            trainer.validate(stats["epoch"])
            if device.type == "cuda":
                torch.cuda.synchronize()
            val_s = time.perf_counter() - started
    memory = trainer.memory.snapshot()
    done, batch, elapsed = stats["steps"], config.train.batch_size, stats["epoch_time_s"]
    crops = min(done * batch, cache.n_train)  # one crop per scan per epoch: the last batch may be short
    row = {
        "batch": batch, "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "off",
        "checkpointing": "on" if config.model.use_gradient_checkpointing else "off",
        "compile": "on" if config.train.compile else "off", "steps": done, "epoch_time_s": elapsed,
        "s_per_step": elapsed / done, "steps_per_s": done / elapsed, "crops_per_s": crops / elapsed,
        "data_wait": stats["data_wait_fraction"], "compute_s_per_step": stats["compute_time_s"] / done,
        "peak_gpu_gib": memory["peak_gpu_allocated_gb"],
        "gpu_total_gib": (torch.cuda.get_device_properties(device).total_memory / 2**30
                          if device.type == "cuda" else None),
        "peak_rss_gib": rss.peak / 2**30, "workers_rss_gib": memory["peak_children_rss_gb"],
        "workers": getattr(loaders.train, "num_workers", 0), "oom": stats["oom_skipped"] > 0,
        "warmup_s": warmup_s, "val_s": val_s, "val_scans": len(cache.data.val) if validate else 0,
    }
    del trainer, model
    release_memory(device)
    return row


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
