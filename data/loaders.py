"""Per-sample seeding, the samplers and the training/validation DataLoaders.

Randomness of the training loader depends only on (seed, epoch): the sampler tags each index with the epoch and
every sample's random transforms are reseeded from (seed, epoch, index). Call ``set_epoch(train_loader, epoch)``
before iterating an epoch (as with DistributedSampler); a resumed run then sees exactly the crops of an
uninterrupted one, whatever the number of workers.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import psutil
import torch
from monai.data import CacheDataset, ThreadDataLoader
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from config import DataConfig
from data.budget import small_volume_warning
from data.preprocess import Preprocessing, preprocessed_shape
from data.records import Case, Cohort
from data.transforms import MAX_HEAD_INDICES, MINED_INDICES_KEY, build_transforms, cache_key
from utils import usable_cpu_count

logger = logging.getLogger(__name__)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1)[0])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one training sample's random transforms: a function of (seed, epoch, index) only."""
    return _derived_seed(seed, 1, epoch, index)


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` so every sample's randomness can be derived from (seed, epoch, index) in whatever
    worker process loads it. The order comes from the wrapped DistributedSampler (``build_dataloaders`` always
    wraps one, with world size 1 for a single process, so single- and multi-process runs share one permutation).
    Call ``set_epoch`` before each epoch."""

    def __init__(self, inner: DistributedSampler, case_ids: Sequence[str] = (), case_ich: Sequence[int] = ()):
        self.inner = inner
        # The scans in dataset order and their ICH labels, for hard-case weights (data.case_sampling).
        self.case_ids, self.case_ich = list(case_ids), list(case_ich)
        self.epoch = 0
        self.case_weights: np.ndarray | None = None
        self.mined: dict[int, np.ndarray] = {}
        self._iterated: set[int] = set()

    def set_epoch(self, epoch: int, case_weights: np.ndarray | None = None,
                  mined: dict[int, np.ndarray] | None = None) -> None:
        """``case_weights`` (one per scan, dataset order; see data.case_sampling): the epoch's scans are drawn
        with replacement in these proportions instead of the shuffled pass; None: the shuffled pass. ``mined``:
        dataset index -> the current model's false-positive voxels in that scan (see mining.py); each is sent to
        the worker with its scan's key (persistent workers see the update); None keeps the last ones."""
        self.epoch = int(epoch)
        if mined is not None:
            self.mined = dict(mined)
        self.inner.set_epoch(self.epoch)
        if case_weights is not None and len(case_weights) != len(self.inner.dataset):  # type: ignore[arg-type]
            raise ValueError(f"{len(case_weights)} case weights for {len(self.inner.dataset)} scans")  # type: ignore
        self.case_weights = None if case_weights is None else np.asarray(case_weights, dtype=np.float64)

    def _order(self) -> list[int]:
        if self.case_weights is None:
            return list(self.inner)
        # The same draw on every rank (seeded by seed and epoch only), each taking its share as DistributedSampler
        # does: rank r gets draws r, r + world_size, ...
        inner = self.inner
        generator = torch.Generator().manual_seed(_derived_seed(inner.seed, 2, self.epoch))
        draws = torch.multinomial(torch.from_numpy(self.case_weights), inner.total_size, replacement=True,
                                  generator=generator).tolist()
        return draws[inner.rank:inner.total_size:inner.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int] | tuple[int, int, np.ndarray]]:
        if self.epoch in self._iterated:
            logger.warning("training sampler iterated twice for epoch %d: call set_epoch(train_loader, epoch) at "
                           "the start of every epoch, or every epoch repeats the same crops", self.epoch)
        self._iterated.add(self.epoch)
        epoch, mined = self.epoch, self.mined
        return iter([(index, epoch, mined[index]) if index in mined else (index, epoch) for index in self._order()])

    def __len__(self) -> int:
        return len(self.inner)


class StageDataset(torch.utils.data.Dataset):
    """``transform(base[index])``. With a ``seed`` the transform is random and is reseeded per sample from
    (seed, epoch, index); indices are then ``(index, epoch)`` pairs from EpochSampler (a bare int means epoch 0),
    or ``(index, epoch, mined)`` triples that add the scan's mined false-positive voxels to the item."""

    def __init__(self, base: torch.utils.data.Dataset, transform: Compose, seed: int | None = None):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple) -> dict[str, Any]:
        index, epoch, *mined = key if isinstance(key, tuple) else (key, 0)
        item = dict(self.base[index])
        if mined:
            item[MINED_INDICES_KEY] = mined[0]
        if self.seed is not None:
            self.transform.set_random_state(seed=sample_seed(self.seed, epoch, index))
        return self.transform(item)


def set_epoch(loader: DataLoader, epoch: int, case_weights: np.ndarray | None = None,
              mined: dict[int, np.ndarray] | None = None) -> None:
    """Make ``loader``'s next pass epoch ``epoch``: the training sampler's order and every crop/augmentation depend
    only on (seed, epoch), ``case_weights`` (hard-case sampling) and ``mined`` (false-positive mining; see
    EpochSampler.set_epoch). Call before iterating each epoch (also after resuming); harmless on the val loader."""
    sampler = loader.sampler
    if isinstance(sampler, EpochSampler):
        sampler.set_epoch(epoch, case_weights, mined)
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _volume_bytes(shape: Sequence[int]) -> int:
    return int(np.prod(shape)) * 5  # float32 image + uint8 label


# RAM a training scan's crop indices take on top of its volume at most (int32 head voxels; hemorrhage is small).
_INDICES_BYTES = 4 * MAX_HEAD_INDICES


def choose_num_workers(data_config: DataConfig, device: torch.device, largest_volume_bytes: int = 0) -> int:
    """DataLoader workers: ``data_config.num_workers`` if set, else one per CPU core left after the training
    process (at most 8), limited so each worker can have ~0.5 GiB + 4 preprocessed volumes of the available RAM."""
    if data_config.num_workers is not None:
        return int(data_config.num_workers)
    by_cpu = max(0, usable_cpu_count() - 1)
    per_worker = 512 * 2**20 + 4 * largest_volume_bytes
    by_memory = int(0.5 * psutil.virtual_memory().available // per_worker)
    workers = max(0, min(8, by_cpu, by_memory))
    logger.info("using %d DataLoader worker(s) (%d CPU cores, %.1f GiB RAM available, device %s)", workers,
                usable_cpu_count(), psutil.virtual_memory().available / 2**30, device)
    return workers


def _exit_when_the_loader_terminates(parent: int) -> None:
    """A worker's SIGTERM watcher thread: exit when the DataLoader itself terminates this worker (the signal comes
    from the parent process, e.g. at interpreter exit), ignore every other SIGTERM. The exit status is 0: the
    parent's worker-failure check would report any other status as a crash while the run is ending."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGINT and SIGTERM to the main process, which decides.

    ``timeout``, systemd, SLURM and a terminal's Ctrl-C signal the whole process group (or cgroup). A worker that
    died of it made the main process raise "DataLoader worker killed by signal" before it could save; a worker that
    inherited the trainer's handler (fork) logged "received SIGINT" once more. Here SIGINT is ignored, and SIGTERM
    is blocked and read by a thread that exits only when the parent sends it: the DataLoader shutting the worker
    down (plain SIG_IGN would make that hang at exit). Without ``sigwaitinfo`` (macOS) SIGTERM keeps its default.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # inherited by the watcher thread
    threading.Thread(target=_exit_when_the_loader_terminates, args=(os.getppid(),), daemon=True,
                     name="sigterm-watcher").start()


def _loader_settings(workers: int, device: torch.device) -> dict[str, Any]:
    on_cuda = device.type == "cuda"
    return {
        "num_workers": workers,
        "worker_init_fn": ignore_stop_signals if workers > 0 else None,
        "pin_memory": on_cuda,                 # page-locked batches make host->GPU copies asynchronous
        "persistent_workers": workers > 0,     # keep workers (and their copy of the RAM cache) across epochs
        "prefetch_factor": (4 if on_cuda else 2) if workers > 0 else None,
    }


def _case_item(case: Case, preprocessing: Preprocessing) -> dict[str, Any]:
    return {"image_path": case.image_path, "mask_path": case.mask_path or "", "ich": float(case.ich),
            "case_id": case.case_id, "spacing": case.spacing, "mask_axes": case.mask_axes,
            "mask_flips": case.mask_flips,
            "cache_key": cache_key(case, preprocessing)}


def _base_dataset(items: list[dict[str, Any]], transform: Compose, in_memory: bool, threads: int
                  ) -> torch.utils.data.Dataset:
    if in_memory and items:
        return CacheDataset(items, transform=transform, num_workers=max(1, threads), progress=False)
    return MonaiDataset(items, transform=transform)


def build_dataloaders(data_config: DataConfig, preprocessing: Preprocessing, cohort: Cohort, batch_size: int,
                      device: torch.device, seed: int, rank: int = 0, world_size: int = 1,
                      augment_on_device: bool | None = None) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders over a validated cohort.

    Train batches: ``image`` B×1×S×S×S float32, ``label`` B×1×S×S×S float32 in {0,1}, ``ich`` (B,) float32,
    ``case_id`` list[str], S = ``preprocessing.input_size``; one crop per scan per epoch. Val batches (batch 1,
    whole preprocessed volume): ``image`` / ``label`` 1×1×D×H×W, ``ich`` (1,), ``case_id`` [str]; spacing =
    ``preprocessing.target_spacing``. ``data_config`` gives the cache folder, workers and sampling settings.

    Preprocessed volumes are cached on disk in ``data_config.cache_dir`` (keyed by file content and every
    preprocessing parameter, see ``cache_key``) and, with ``cache_in_memory``, also in RAM (MONAI CacheDataset,
    filled here), so epochs after the first never touch the raw files. With ``world_size > 1`` the train set is
    sharded by DistributedSampler(shuffle, seed) and val by DistributedSampler(shuffle=False, drop_last=False),
    which repeats a few val scans to even the shards when len(val) is not a multiple of world_size.

    On a GPU (``augment_on_device`` None means: when ``device`` is cuda) training crops are augmented on the
    device, MONAI's fast-training recipe: the RAM cache feeds a ThreadDataLoader (a background thread, no worker
    processes, which cannot share a CUDA context), each crop is sliced on the host, copied to the device and
    flipped, resampled and jittered there. Crops and augmentation parameters are the same either way (seeded per
    sample); only the arithmetic moves.

    The trainer must call ``set_epoch(train_loader, epoch)`` before each epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if not cohort.train:
        raise ValueError("the cohort has no training scans")
    if data_config.cache_dir is None:
        raise ValueError("data_config.cache_dir is None; resolve it (default <output_dir>/cache) before building "
                         "the loaders")
    device = torch.device(device)
    if augment_on_device is None:
        augment_on_device = device.type == "cuda"
    cache_dir = Path(data_config.cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    transforms = build_transforms(preprocessing, cache_dir, data_config.positive_crop_fraction,
                                  data_config.augmentation_prob, augment_device=device if augment_on_device else None,
                                  hard_negative_crop_fraction=data_config.hard_negative_crop_fraction,
                                  in_plane_rotation_deg=data_config.in_plane_rotation_deg,
                                  scale_augmentation=data_config.scale_augmentation,
                                  lesion_paste_prob=data_config.lesion_paste_prob,
                                  lesion_paste_into_negatives=data_config.lesion_paste_into_negatives,
                                  streak_augmentation_prob=data_config.streak_augmentation_prob,
                                  lesion_paste_at_bone=data_config.lesion_paste_at_bone,
                                  mined_crop_fraction=data_config.false_positive_crop_fraction)
    train_items = [_case_item(c, preprocessing) for c in cohort.train]
    val_items = [_case_item(c, preprocessing) for c in cohort.val]

    shapes = [preprocessed_shape(cohort.case_stats[c.case_id]["shape"], c.spacing, preprocessing.target_spacing)
              for c in cohort.train + cohort.val if c.case_id in cohort.case_stats]
    small = small_volume_warning(shapes, preprocessing.input_size, preprocessing.target_spacing)
    if small is not None and rank == 0:
        logger.warning("data: %s", small)
    largest = max((_volume_bytes(s) for s in shapes), default=0)
    workers = choose_num_workers(data_config, device, largest)
    in_memory = data_config.cache_in_memory
    if in_memory and shapes:
        needed = sum(_volume_bytes(s) for s in shapes) + len(cohort.train) * _INDICES_BYTES
        available = psutil.virtual_memory().available
        if needed > 0.5 * available:
            logger.warning("cache_in_memory needs about %.1f GiB but only %.1f GiB of RAM is available: keeping "
                           "preprocessed volumes on disk only (%s)", needed / 2**30, available / 2**30, cache_dir)
            in_memory = False

    started = time.perf_counter()
    threads = max(1, workers, min(usable_cpu_count(), 4))
    train_base = _base_dataset(train_items, transforms.train_cached, in_memory, threads)
    val_base = _base_dataset(val_items, transforms.val_cached, in_memory, threads)
    if in_memory:
        logger.info("cached %d preprocessed volumes in RAM in %.1f s", len(train_items) + len(val_items),
                    time.perf_counter() - started)
    if transforms.lesion_bank is not None:
        # Before any worker starts (they inherit the bank); one pass over the cached training scans.
        transforms.lesion_bank.add_items(train_base[i] for i in range(len(train_base)))
    train_set = StageDataset(train_base, Compose([transforms.train_random, transforms.finalize]), seed=seed)
    val_set = StageDataset(val_base, transforms.finalize)

    # One permutation for every world size: DistributedSampler's, also for a single process. Rank r takes
    # perm[r::world_size], so global step k of a multi-process run sees the same scans (and, seeded per index, the
    # same crops) as step k of a single process whose batch is world_size times larger.
    inner = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                               drop_last=False)
    sampler = EpochSampler(inner, case_ids=[c.case_id for c in cohort.train], case_ich=[c.ich for c in cohort.train])
    if augment_on_device:
        # Batches are born on the device: no pinning, no worker processes; one thread overlaps loading with compute.
        train_loader = ThreadDataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=False,
                                        num_workers=0, buffer_size=2)
        logger.info("training crops are augmented on %s (ThreadDataLoader)", device)
    else:
        train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=False,
                                  generator=torch.Generator().manual_seed(seed), **_loader_settings(workers, device))
    val_sampler = (DistributedSampler(val_set, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
                   if world_size > 1 else None)
    val_loader = DataLoader(val_set, batch_size=1, sampler=val_sampler, shuffle=False,
                            **_loader_settings(min(workers, 2), device))
    return train_loader, val_loader
