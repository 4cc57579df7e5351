"""Run-support utilities: seeding and RNG state, crash-safe file writes, system checks, memory and time
accounting, run summaries, checkpoint retention, metrics CSV, learning-curve and overlay pictures, logging.

Every function takes plain arguments (paths, numbers, dicts) so it can be used without a Config.
Nothing here runs at import time; matplotlib is imported inside the plotting functions and only through its
object API (``Figure`` + ``FigureCanvasAgg``), so no global pyplot state or backend switch is involved.
Memory sizes are reported in GB meaning 2**30 bytes (what ``nvidia-smi`` and ``free -g`` call GiB).
"""
from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import datetime as dt
import enum
import importlib.metadata
import io
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path, PurePath
from typing import IO, Any, Iterator, Mapping, Sequence

import numpy as np
import psutil
import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

GB = 1024**3

# ---------------------------------------------------------------------------------------------------------------
# Seeding and RNG state
# ---------------------------------------------------------------------------------------------------------------

RNG_STATE_VERSION = 1


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python ``random``, NumPy's global generator and torch (CPU and every CUDA device).

    ``deterministic`` also asks cuDNN for deterministic kernels and switches off its autotuner. Both are cheap
    for this project: the encoder is matmul-bound, and validation volumes change shape from case to case, so
    autotuning would re-benchmark on nearly every batch anyway. Fully deterministic algorithms
    (``torch.use_deterministic_algorithms``) are not forced because some 3-D ops would then raise.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})")
    if not 0 <= seed < 2**32:
        # NumPy's legacy seeding accepts exactly this range; fail here rather than deep inside numpy.
        raise ValueError(f"seed must be in [0, 2**32 - 1], got {seed}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily when CUDA is not initialised yet)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = deterministic


def capture_rng_state() -> dict[str, Any]:
    """The state of every global random generator as plain data.

    Only dicts, lists, ints, floats, strings, None and torch tensors are used, so the result can go into a
    checkpoint and be read back with ``torch.load(weights_only=True)``. CUDA states are included when CUDA is
    available (one ByteTensor per visible device).
    """
    py_version, py_internal, py_gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "version": RNG_STATE_VERSION,
        "python": {"version": int(py_version), "internal": [int(v) for v in py_internal],
                   "gauss_next": None if py_gauss_next is None else float(py_gauss_next)},
        # uint32 keys held as int64 so no numpy dtype needs to be unpickled.
        "numpy": {"bit_generator": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back the generator states recorded by ``capture_rng_state`` (e.g. from a checkpoint).

    Raises ValueError when ``state`` is not such a record. A CUDA state recorded on another number of devices
    (or on a GPU machine when resuming on CPU) is restored as far as it goes, with a warning.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"RNG state must be a dict from capture_rng_state(), got {type(state).__name__}")
    missing = [key for key in ("version", "python", "numpy", "torch") if key not in state]
    if missing:
        raise ValueError(f"RNG state lacks {', '.join(missing)}; expected the dict written by capture_rng_state() "
                         f"(keys found: {', '.join(map(str, state)) or 'none'})")
    if state["version"] != RNG_STATE_VERSION:
        raise ValueError(f"RNG state version {state['version']!r} is not supported (expected {RNG_STATE_VERSION})")

    py = state["python"]
    gauss_next = py["gauss_next"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"]), gauss_next))

    npy = state["numpy"]
    keys = np.asarray(torch.as_tensor(npy["keys"]).cpu().numpy(), dtype=np.uint32)
    np.random.set_state((npy["bit_generator"], keys, int(npy["pos"]), int(npy["has_gauss"]),
                         float(npy["cached_gaussian"])))

    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())

    cuda_states = state.get("cuda")
    if cuda_states:
        if not torch.cuda.is_available():
            logger.warning("checkpoint holds CUDA RNG states for %d device(s) but CUDA is not available; "
                           "CUDA random streams will differ from the original run", len(cuda_states))
            return
        available = torch.cuda.device_count()
        if available != len(cuda_states):
            logger.warning("checkpoint holds CUDA RNG states for %d device(s), this machine has %d; restoring the "
                           "first %d", len(cuda_states), available, min(available, len(cuda_states)))
        for index, device_state in enumerate(cuda_states[:available]):
            torch.cuda.set_rng_state(torch.as_tensor(device_state, dtype=torch.uint8).cpu(), index)


# ---------------------------------------------------------------------------------------------------------------
# Crash-safe writes
# ---------------------------------------------------------------------------------------------------------------

def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk (POSIX only)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        # Some network/FUSE file systems refuse fsync on a directory. The file itself is complete and renamed
        # by now, so this only weakens durability across a power loss; it is not a failed save.
        logger.debug("could not fsync directory %s: %s", directory, err)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike, binary: bool) -> Iterator[IO]:
    """Yield a temporary file next to ``path``; on success it replaces ``path`` in one rename.

    If the body raises (or the process is interrupted), the temporary file is deleted and whatever was at
    ``path`` before is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600; give the result the old file's mode, or the usual 0644 for a new one.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        open_kwargs = {} if binary else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, "wb" if binary else "w", **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        # Clean up and re-raise: a failed save must not leave a half-written temp file behind.
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a truncated file at ``path`` (temp file + fsync + ``os.replace``)."""
    with _atomic_file(path, binary=True) as handle:
        torch.save(obj, handle)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text to ``path`` atomically; newlines are written exactly as given."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text expects str, got {type(text).__name__}")
    with _atomic_file(path, binary=False) as handle:
        handle.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` atomically."""
    with _atomic_file(path, binary=True) as handle:
        handle.write(data)


# ---------------------------------------------------------------------------------------------------------------
# Devices and system checks
# ---------------------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """Map ``"auto" | "cuda" | "cuda:N" | "cpu"`` to a torch.device.

    "auto" picks CUDA when available. Asking for CUDA on a machine without it raises ValueError rather than
    silently training on CPU.
    """
    if not isinstance(name, str):
        raise ValueError(f"device must be a string ('auto', 'cuda', 'cuda:N' or 'cpu'), got {name!r}")
    key = name.strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", key)
    if match is None:
        raise ValueError(f"unknown device {name!r}; expected 'auto', 'cuda', 'cuda:N' or 'cpu'")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        raise ValueError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__}, {build} "
                         "build, or no GPU visible); use --device cpu or --device auto")
    if match.group(1) is not None:
        index = int(match.group(1))
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device {name!r} requested but only {count} CUDA device(s) are visible "
                             f"(valid: cuda:0 .. cuda:{count - 1})")
        return torch.device("cuda", index)
    return torch.device("cuda")


def _package_version(name: str) -> str | None:
    # Read from the installed metadata: no need to import (slow) packages just to print their version.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def usable_cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def collect_system_info(device: torch.device) -> dict[str, Any]:
    """Versions and resources of this machine, for logs, the run summary and bug reports (JSON-safe)."""
    memory = psutil.virtual_memory()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "torch": torch.__version__,
        "monai": _package_version("monai"),
        "numpy": np.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu_name": None,
        "gpu_total_gb": None,
        "gpu_free_gb": None,
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable_cpu_count(),
        "ram_total_gb": round(memory.total / GB, 2),
        "ram_available_gb": round(memory.available / GB, 2),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        info.update(gpu_name=props.name, gpu_total_gb=round(total / GB, 2), gpu_free_gb=round(free / GB, 2))
    return info


def _existing_ancestor(path: Path) -> Path:
    """The output folder may not exist yet; its free space is that of the nearest existing parent."""
    path = path.absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def run_system_checks(device: torch.device, output_dir: str | os.PathLike, estimated_gpu_gb: float | None,
                      estimated_ram_gb: float | None, min_free_disk_gb: float = 5.0,
                      min_available_ram_gb: float = 2.0) -> list[str]:
    """Look for resource problems before training starts; return the warnings (each is also logged).

    Checks: free disk where the outputs go (< ``min_free_disk_gb``), available RAM (below ``estimated_ram_gb``
    when given, else below ``min_available_ram_gb``), and free GPU memory below ``estimated_gpu_gb``. Nothing
    here raises for a resource problem: a probe that fails becomes a warning too.
    """
    warnings: list[str] = []
    target = _existing_ancestor(Path(output_dir))
    try:
        free_disk_gb = shutil.disk_usage(target).free / GB
    except OSError as err:
        warnings.append(f"could not measure free disk space at {target}: {err}")
    else:
        if free_disk_gb < min_free_disk_gb:
            warnings.append(f"only {free_disk_gb:.1f} GB free on the disk of {target} (want >= {min_free_disk_gb:g} GB "
                            "for checkpoints, cache and logs); a checkpoint save may fail mid-run")

    available_ram_gb = psutil.virtual_memory().available / GB
    if estimated_ram_gb is not None and available_ram_gb < estimated_ram_gb:
        warnings.append(f"available RAM {available_ram_gb:.1f} GB is below the estimated need of "
                        f"{estimated_ram_gb:.1f} GB; consider --no-cache_in_memory or fewer --num_workers")
    elif estimated_ram_gb is None and available_ram_gb < min_available_ram_gb:
        warnings.append(f"only {available_ram_gb:.1f} GB RAM available (want >= {min_available_ram_gb:g} GB)")

    if device.type == "cuda" and estimated_gpu_gb is not None:
        try:
            free_gpu, total_gpu = torch.cuda.mem_get_info(device)
        except RuntimeError as err:
            warnings.append(f"could not query free memory on {device}: {err}")
        else:
            if free_gpu / GB < estimated_gpu_gb:
                warnings.append(f"{device} has {free_gpu / GB:.1f} GB free of {total_gpu / GB:.1f} GB, below the "
                                f"estimated need of {estimated_gpu_gb:.1f} GB; expect out-of-memory errors - lower "
                                "--batch_size, or enable --use_mixed_precision / --use_gradient_checkpointing")

    for message in warnings:
        logger.warning(message)
    return warnings


# ---------------------------------------------------------------------------------------------------------------
# Training-memory estimate
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemoryProfile:
    """Architecture numbers the training-memory estimate needs (see ``estimate_training_memory_gb``)."""

    num_parameters: int       # all parameters
    encoder_parameters: int   # parameters of the image encoder (frozen with --freeze_encoder)
    depth: int                # transformer blocks in the encoder
    width: int                # token width
    heads: int                # attention heads
    patch_size: int           # voxels per token edge: tokens = (img_size / patch_size)**3
    global_blocks: int        # blocks that attend over all tokens; the rest attend within windows
    window_size: int          # window edge in tokens: each query of a window block sees window_size**3 keys


# sam_med3d_turbo: parameter counts are those of the published checkpoint (shared/reference: 100,509,616 in all,
# 92,924,928 in the image encoder); the rest is the ViT-B of SAM-Med3D (12 blocks, 768 wide, 12 heads, 16^3
# patches, global attention in 4 blocks, 14^3 windows in the other 8).
# tiny: model.build_tiny (64^3 input, 8^3 patches, 2 blocks 64 wide, 4 heads, 12^3 windows, block 1 global);
# parameter counts read from the built model. Pass ``num_parameters`` when an architecture changes.
MEMORY_PROFILES: dict[str, MemoryProfile] = {
    "sam_med3d_turbo": MemoryProfile(num_parameters=100_509_616, encoder_parameters=92_924_928, depth=12,
                                     width=768, heads=12, patch_size=16, global_blocks=4, window_size=14),
    "tiny": MemoryProfile(num_parameters=361_308, encoder_parameters=232_864, depth=2, width=64, heads=4,
                          patch_size=8, global_blocks=1, window_size=12),
}

# Bytes per trainable parameter: fp32 weight (4) + fp32 gradient (4) + AdamW exp_avg and exp_avg_sq (4 + 4).
_BYTES_PER_TRAINABLE_PARAM = 16
# Bytes per frozen parameter: the fp32 weight only.
_BYTES_PER_FROZEN_PARAM = 4
# Under autocast the 16-bit copies of the weights used in the forward are cached for the step.
_AUTOCAST_WEIGHT_COPY_BYTES = 2
# Activation elements a pre-norm ViT block keeps for backward, per token and per unit of width:
# norm1 input 1 + qkv input 1 + q,k,v 3 + attention output 1 + norm2 input 1 + fc1 input 1 + GELU input 4
# + fc2 input 4 = 16. This is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
# Models"): 34*s*h bytes at 2 bytes per element, less the two dropout masks our blocks do not have.
_BLOCK_ELEMENTS_PER_TOKEN_WIDTH = 16
# Attention-score elements kept per (head, query, key): the softmax output and the score tensor that the
# decomposed relative-position bias is added to (an upper bound when fused SDPA kernels avoid materialising it).
_SCORE_ELEMENTS_PER_ENTRY = 2
# Elements per input voxel outside the encoder, for one prompt round: the 128^3 mask logits, their sigmoid and
# the Dice/BCE intermediates (about 7 voxel-sized tensors), plus the decoder's transposed-conv upscaling
# (96 channels at (S/8)^3 and 48 at (S/4)^3 with LayerNorm+GELU, about 2 per input voxel) and the label: ~10.
_HEAD_ELEMENTS_PER_VOXEL_PER_ROUND = 10
# Caching-allocator fragmentation, cuBLAS/cuDNN workspaces and backward temporaries: +25 %.
_ALLOCATOR_OVERHEAD = 1.25


def estimate_training_memory_gb(model_name: str, batch_size: int, mixed_precision: bool,
                                gradient_checkpointing: bool, img_size: int, *, freeze_encoder: bool = False,
                                click_rounds: int = 1, num_parameters: int | None = None) -> float:
    """A rough estimate of peak GPU memory (GB) for one training step; for warnings, not for planning to the MB.

    peak = overhead * (weight state + batch_size * activations per sample), where

    - weight state: 16 bytes per trainable parameter (weight, gradient, two AdamW moments), 4 per frozen one,
      plus 2 per parameter under autocast (16-bit weight copies);
    - encoder activations per sample: each block keeps 16 * tokens * width elements plus 2 elements per
      attention score (heads * tokens * keys, keys = all tokens in global blocks and window_size**3 in window
      blocks, where only the real tokens are queried). Gradient checkpointing keeps only each block's input
      (tokens * width) plus one block being recomputed; a frozen encoder keeps nothing for backward;
    - decoder and loss: 10 elements per input voxel per prompt round, plus the input itself;
    - 4 bytes per activation element in fp32, 2 under mixed precision.

    Worked example, sam_med3d_turbo at 128^3 in fp32: 512 tokens; a global block keeps 6.3 M + 6.3 M elements,
    a window block 6.3 M + 33.7 M (keys = 14^3 = 2744); 4 global + 8 window blocks = 370 M elements = 1.38 GB per
    sample, plus 0.09 GB for decoder and loss; the weight state is 1.50 GB; batch 2 with the 25 % allocator
    overhead comes to 1.25 * (1.50 + 2 * 1.47) = 5.5 GB.
    """
    if model_name not in MEMORY_PROFILES:
        raise ValueError(f"no memory profile for model {model_name!r}; known: {', '.join(MEMORY_PROFILES)}")
    for label, value in (("batch_size", batch_size), ("img_size", img_size), ("click_rounds", click_rounds)):
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    profile = MEMORY_PROFILES[model_name]
    if img_size % profile.patch_size:
        raise ValueError(f"img_size must be a multiple of the patch size {profile.patch_size}, got {img_size}")
    total_params = num_parameters if num_parameters is not None else profile.num_parameters
    encoder_params = min(profile.encoder_parameters, total_params)

    frozen = encoder_params if freeze_encoder else 0
    trainable = total_params - frozen
    weight_bytes = trainable * _BYTES_PER_TRAINABLE_PARAM + frozen * _BYTES_PER_FROZEN_PARAM
    if mixed_precision:
        weight_bytes += total_params * _AUTOCAST_WEIGHT_COPY_BYTES

    tokens = (img_size // profile.patch_size) ** 3
    token_elements = _BLOCK_ELEMENTS_PER_TOKEN_WIDTH * tokens * profile.width

    def block_elements(keys: int) -> int:
        return token_elements + _SCORE_ELEMENTS_PER_ENTRY * profile.heads * tokens * keys

    # A window block pads the token grid to whole windows and attends without a padding mask, so every real
    # query sees window_size**3 keys even when the grid (8^3 at 128^3) is smaller than one window.
    window_keys = profile.window_size**3
    blocks = ([block_elements(tokens)] * profile.global_blocks
              + [block_elements(window_keys)] * (profile.depth - profile.global_blocks))
    if freeze_encoder:
        encoder_elements = max(blocks)  # forward-only: one block's temporaries at a time
    elif gradient_checkpointing:
        encoder_elements = profile.depth * tokens * profile.width + max(blocks)
    else:
        encoder_elements = sum(blocks)
    voxels = img_size**3
    head_elements = voxels * (1 + _HEAD_ELEMENTS_PER_VOXEL_PER_ROUND * click_rounds)
    bytes_per_element = 2 if mixed_precision else 4
    activation_bytes = batch_size * (encoder_elements + head_elements) * bytes_per_element

    return _ALLOCATOR_OVERHEAD * (weight_bytes + activation_bytes) / GB


# ---------------------------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    """Whole seconds as ``"1h 02m 03s"``, ``"4m 05s"`` or ``"7s"`` (hours are not folded into days)."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be a finite number of seconds >= 0, got {seconds!r}")
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


class EtaEstimator:
    """Time left from the mean duration of the last ``window`` training epochs and validations.

    A moving window rather than the all-time mean: the first epoch is usually slow (cache filling, kernel
    warm-up) and should stop mattering after a few epochs. Validation is timed on its own because it can cost
    more than the training epoch (whole volumes, simulated clicks) and need not run every epoch.
    """

    def __init__(self, window: int = 5) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._durations: collections.deque[float] = collections.deque(maxlen=window)
        self._validations: collections.deque[float] = collections.deque(maxlen=window)

    @staticmethod
    def _checked(seconds: float, what: str) -> float:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"{what} duration must be finite and >= 0 s, got {seconds!r}")
        return float(seconds)

    def update(self, epoch_seconds: float, validation_seconds: float | None = None) -> None:
        """Record how long the training epoch that just ended took, and its validation when it had one."""
        self._durations.append(self._checked(epoch_seconds, "epoch"))
        if validation_seconds is not None:
            self._validations.append(self._checked(validation_seconds, "validation"))

    @property
    def average_epoch_seconds(self) -> float | None:
        """Mean training-epoch duration of the recorded window, or None before the first update."""
        if not self._durations:
            return None
        return sum(self._durations) / len(self._durations)

    @property
    def average_validation_seconds(self) -> float | None:
        """Mean validation duration of the recorded window, or None before the first validation."""
        if not self._validations:
            return None
        return sum(self._validations) / len(self._validations)

    def eta_seconds(self, remaining_epochs: int, remaining_validations: int = 0) -> float | None:
        """Estimated seconds for ``remaining_epochs`` more epochs, ``remaining_validations`` of them validated;
        None until one epoch was recorded."""
        if remaining_epochs < 0 or remaining_validations < 0:
            raise ValueError(f"remaining epochs and validations must be >= 0, got {remaining_epochs} and "
                             f"{remaining_validations}")
        average = self.average_epoch_seconds
        if average is None:
            return None
        return average * remaining_epochs + (self.average_validation_seconds or 0.0) * remaining_validations


# ---------------------------------------------------------------------------------------------------------------
# Memory accounting
# ---------------------------------------------------------------------------------------------------------------

def _ru_maxrss_bytes() -> int | None:
    """Lifetime peak RSS of this process from getrusage: KiB on Linux, bytes on macOS, absent on Windows."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryMonitor:
    """Peak host and GPU memory over an epoch.

    Host RSS has no resettable peak counter, so the peak is the maximum over ``sample()`` calls (call it every
    few steps); ``ru_maxrss`` is reported too but is the peak over the whole process lifetime. DataLoader workers
    are separate processes: the RSS of all child processes (workers, and wandb's service when tracking) is
    summed as ``peak_children_rss_gb`` (pages shared copy-on-write with the parent are counted in both, so this
    overstates). On CUDA the allocator's own peak counters are used.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._process = psutil.Process()
        self._peak_rss = 0
        self._peak_children_rss = 0

    def _children_rss(self) -> int:
        total = 0
        for child in self._process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # a worker that exited between listing and reading has no memory to count
        return total

    def reset(self) -> None:
        """Start a new measuring period (call at epoch start)."""
        self._peak_rss = 0
        self._peak_children_rss = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sample()

    def sample(self) -> None:
        """Read the current RSS of this process and its children and update the peaks."""
        self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
        self._peak_children_rss = max(self._peak_children_rss, self._children_rss())

    def snapshot(self) -> dict[str, float | None]:
        """Peaks since ``reset()`` in GB (takes one more sample first)."""
        self.sample()
        maxrss = _ru_maxrss_bytes()
        result: dict[str, float | None] = {
            "rss_gb": self._process.memory_info().rss / GB,
            "peak_rss_gb": self._peak_rss / GB,
            "peak_children_rss_gb": self._peak_children_rss / GB,
            "ru_maxrss_gb": None if maxrss is None else maxrss / GB,
            "peak_gpu_allocated_gb": None,
            "peak_gpu_reserved_gb": None,
        }
        if self.device.type == "cuda":
            result["peak_gpu_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / GB
            result["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / GB
        return result


# ---------------------------------------------------------------------------------------------------------------
# JSON summaries
# ---------------------------------------------------------------------------------------------------------------

def to_jsonable(value: Any, _where: str = "value") -> Any:
    """Convert ``value`` to data ``json.dumps`` accepts without surprises.

    numpy and torch scalars become Python numbers, arrays and tensors lists, Paths strings, tuples and sets
    lists, dataclasses dicts, datetimes ISO strings, enums their value; NaN and +-inf become None (JSON has no
    such numbers). Anything else raises TypeError naming where it was found.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return to_jsonable(value.item(), _where)
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), _where)
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu()
        return to_jsonable(data.item() if data.ndim == 0 else data.tolist(), _where)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, f"{_where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v, f"{_where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, _where)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), _where)
    raise TypeError(f"{_where}: cannot convert {type(value).__module__}.{type(value).__qualname__} to JSON")


def write_training_summary(output_dir: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """Write ``summary`` to ``<output_dir>/training_summary_<YYYYmmdd-HHMMSS>.json`` atomically; return the path.

    Values go through ``to_jsonable`` (NaN/inf -> null). Two summaries in the same second get ``-1``, ``-2``...
    suffixes instead of overwriting each other.
    """
    output_dir = Path(output_dir)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = output_dir / f"training_summary_{stamp}.json"
    suffix = 1
    while path.exists():
        path = output_dir / f"training_summary_{stamp}-{suffix}.json"
        suffix += 1
    text = json.dumps(to_jsonable(summary, "summary"), indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint retention
# ---------------------------------------------------------------------------------------------------------------

PROTECTED_CHECKPOINTS = frozenset({"best_model.pth", "latest_model.pth", "sam_encoder.pth"})


def cleanup_checkpoints(output_dir: str | os.PathLike, keep: int,
                        pattern: str = "checkpoint_epoch_*.pth") -> list[Path]:
    """Delete all but the ``keep`` highest-epoch snapshots matching ``pattern``; return the deleted paths.

    The epoch is the number standing where the single ``*`` is (``checkpoint_epoch_12.pth`` -> 12), so epoch 10
    sorts after epoch 9. Files where ``*`` is not a number, and best/latest/encoder files, are never touched.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    if pattern.count("*") != 1 or any(c in pattern for c in "?[]/"):
        raise ValueError(f"pattern must be a file name with exactly one '*' standing for the epoch, got {pattern!r}")
    prefix, suffix = pattern.split("*")
    number = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))
    snapshots: list[tuple[int, Path]] = []
    for path in Path(output_dir).glob(pattern):
        match = number.fullmatch(path.name)
        if match is None or path.name in PROTECTED_CHECKPOINTS or not path.is_file():
            continue
        snapshots.append((int(match.group(1)), path))
    snapshots.sort(key=lambda item: item[0], reverse=True)
    deleted = []
    for _, path in snapshots[keep:]:
        path.unlink()
        deleted.append(path)
        logger.debug("removed old checkpoint %s", path)
    return deleted


# ---------------------------------------------------------------------------------------------------------------
# metrics.csv
# ---------------------------------------------------------------------------------------------------------------

def _parse_csv_value(text: str) -> int | float | str | None:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _format_csv_value(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(float(value))  # shortest text that reads back to the same float; a NaN loss stays visible
    if isinstance(value, (bool, int, str, PurePath)):
        return str(value)
    raise ValueError(f"metrics.csv cells must be numbers, strings or None, got {type(value).__name__}: {value!r}")


class MetricsCsvLogger:
    """One row per epoch in a CSV file that survives restarts.

    Existing rows are read on construction, so a resumed run continues the same file; call
    ``truncate_after(checkpoint_epoch)`` first to drop epochs the checkpoint does not contain. A metric that
    appears for the first time later (e.g. a validation-only column) extends the header; the file is rewritten
    atomically on every change, which is cheap at one row per epoch and never leaves a half-written file.
    """

    def __init__(self, path: str | os.PathLike, epoch_key: str = "epoch") -> None:
        self.path = Path(path)
        self.epoch_key = epoch_key
        self._columns: list[str] = []
        self._rows: list[dict[str, Any]] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        with self.path.open("r", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = []
            for line_number, raw in enumerate(reader, start=2):
                if None in raw:
                    raise ValueError(f"{self.path}: line {line_number} has more cells than the header's "
                                     f"{len(columns)} columns")
                rows.append({k: _parse_csv_value(v or "") for k, v in raw.items()})
        if rows and self.epoch_key not in columns:
            raise ValueError(f"{self.path}: expected a {self.epoch_key!r} column, found {', '.join(columns)}")
        self._columns, self._rows = columns, rows

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """All rows as dicts with numbers parsed back (empty cells -> None); usable as learning-curve history."""
        return [dict(row) for row in self._rows]

    def append(self, row: Mapping[str, Any]) -> None:
        """Append the row of one epoch; epochs must increase (resume: ``truncate_after`` first)."""
        if self.epoch_key not in row:
            raise ValueError(f"metrics row needs an {self.epoch_key!r} entry, got keys {', '.join(map(str, row))}")
        epoch = row[self.epoch_key]
        if self._rows:
            last = self._rows[-1][self.epoch_key]
            if not epoch > last:
                raise ValueError(f"{self.path}: epoch {epoch} logged after epoch {last}; epochs must increase "
                                 f"(call truncate_after({epoch - 1}) when resuming)")
        cells = {str(k): _format_csv_value(v) for k, v in row.items()}
        for key in cells:
            if key not in self._columns:
                self._columns.append(key)
        self._rows.append({k: _parse_csv_value(v) for k, v in cells.items()})
        self._write()

    def truncate_after(self, epoch: int) -> int:
        """Drop rows of epochs after ``epoch``; return how many were dropped."""
        kept = [row for row in self._rows if row.get(self.epoch_key) is not None and row[self.epoch_key] <= epoch]
        dropped = len(self._rows) - len(kept)
        if dropped:
            self._rows = kept
            self._write()
            logger.info("%s: dropped %d row(s) after epoch %d", self.path, dropped, epoch)
        return dropped

    def _write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self._columns, lineterminator="\n")
        writer.writeheader()
        for row in self._rows:
            writer.writerow({k: _format_csv_value(row.get(k)) for k in self._columns})
        atomic_write_text(self.path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------

# (panel title, y-label, [(history key, legend label), ...])
LEARNING_CURVE_PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("Loss", "loss", (("train_loss", "train"), ("val_loss", "validation"))),
    ("Validation Dice", "Dice", (("val_dice", "prompt-free"), ("val_dice_1click", "1 click"),
                                  ("val_dice_3click", "3 clicks"), ("val_dice_5click", "5 clicks"))),
    ("Learning rate", "lr", (("lr", "lr"),)),
)


def _finite_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, (str, bool)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure: Any, path: str | os.PathLike, dpi: int) -> None:
    with _atomic_file(path, binary=True) as handle:
        figure.savefig(handle, format="png", dpi=dpi)


def plot_learning_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                         panels: Sequence[tuple[str, str, Sequence[tuple[str, str]]]] = LEARNING_CURVE_PANELS) -> None:
    """Plot per-epoch metrics (one dict per epoch, e.g. ``MetricsCsvLogger.rows``) into a PNG.

    x is ``epoch`` when present, else the row number (1-based). Missing keys, None and non-finite values are
    skipped, so validation metrics logged every few epochs still draw as lines through their points. The
    learning rate is drawn on a log scale when all its values are positive.
    """
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(4.2 * len(panels), 3.4)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, ylabel, series) in zip(axes, panels):
        drawn = False
        for key, label in series:
            xs, ys = [], []
            for index, row in enumerate(history):
                y = _finite_or_none(row.get(key))
                x = _finite_or_none(row.get("epoch"))
                if y is not None:
                    xs.append(x if x is not None else index + 1)
                    ys.append(y)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
                drawn = True
                if key == "lr" and min(ys) > 0:
                    ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if drawn:
            if len(series) > 1:
                ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    _save_figure(figure, path, dpi=100)


def _as_volume(name: str, array: Any, shape: tuple[int, ...] | None) -> np.ndarray | None:
    if array is None:
        return None
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    volume = np.asarray(array)
    if volume.ndim != 3:
        raise ValueError(f"{name} must be a 3-D volume D×H×W, got shape {volume.shape}")
    if shape is not None and volume.shape != shape:
        raise ValueError(f"{name} shape {volume.shape} does not match the image shape {shape}")
    return volume


def select_overlay_slices(label: np.ndarray | None, prediction: np.ndarray | None, axis: int,
                          num_slices: int, size: int) -> list[int]:
    """Indices along ``axis`` with the most blood, in increasing order: ranked by the ground truth when it has
    any (so a poor prediction that floods whole slices cannot push the hemorrhage out of the picture), else by
    the prediction. With no foreground at all, the middle slice.
    """
    masks = [m > 0.5 for m in (label, prediction) if m is not None and (m > 0.5).any()]
    if not masks:
        return [size // 2]
    other_axes = tuple(a for a in range(3) if a != axis)
    counts = masks[0].sum(axis=other_axes)
    if not counts.any():
        return [size // 2]
    # Most blood first; among equal counts the lower index, so the choice is deterministic.
    order = sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i))
    return sorted(int(i) for i in order[:num_slices])


def save_overlay_png(image: np.ndarray, label: np.ndarray | None, prediction: np.ndarray | None,
                     path: str | os.PathLike, title: str, *, axis: int = 2, num_slices: int = 3) -> None:
    """Draw the slices with the most blood, the ground truth (green) and prediction (red) outlined, into a PNG.

    ``image``, ``label`` and ``prediction`` are D×H×W arrays in the same grid (masks: > 0.5 is foreground;
    either may be None, e.g. for a scan without a mask). Slices are taken along ``axis``: 2 is the axial
    (slice) axis of the stored CT volumes, which are 512×512×N in array order. The image is shown with a
    1-99 percentile grey window so windowed and z-scored volumes both look sensible.
    """
    volume = _as_volume("image", image, None)
    assert volume is not None
    label_vol = _as_volume("label", label, volume.shape)
    pred_vol = _as_volume("prediction", prediction, volume.shape)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    indices = select_overlay_slices(label_vol, pred_vol, axis, num_slices, volume.shape[axis])

    finite = volume[np.isfinite(volume)]
    low, high = (np.percentile(finite, (1, 99)) if finite.size else (0.0, 1.0))
    if high <= low:
        high = low + 1.0

    figure = _new_figure(3.6 * len(indices), 4.0)
    axes = figure.subplots(1, len(indices), squeeze=False)[0]
    for ax, index in zip(axes, indices):
        ax.imshow(np.take(volume, index, axis=axis), cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        parts = [f"slice {index}"]
        for name, mask, colour in (("label", label_vol, "lime"), ("pred", pred_vol, "red")):
            if mask is None:
                continue
            plane = np.take(mask, index, axis=axis) > 0.5
            parts.append(f"{name} {int(plane.sum())} vox")
            if plane.any() and not plane.all():  # contour needs both levels present to draw a line
                ax.contour(plane.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.0)
        ax.set_title(", ".join(parts), fontsize="small")
        ax.set_axis_off()
    legend = "green: label, red: prediction" if label_vol is not None and pred_vol is not None else ""
    figure.suptitle(f"{title}\n{legend}" if legend else title, fontsize="medium")
    _save_figure(figure, path, dpi=100)


# ---------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------

_HANDLER_TAG = "_ichseg_handler"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TqdmLoggingHandler(logging.Handler):
    """Console handler that prints through ``tqdm.write`` so log lines do not break progress bars."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            # sys.stderr is looked up at emit time so redirected/captured streams are honoured.
            tqdm.write(message, file=self._stream or sys.stderr)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - the logging contract: report through handleError, never raise
            self.handleError(record)


def setup_logging(output_dir: str | os.PathLike | None, rank: int = 0, level: int = logging.INFO,
                  log_name: str = "train.log") -> None:
    """Configure the root logger for a training process.

    Rank 0: console (via tqdm) and, when ``output_dir`` is given, ``<output_dir>/<log_name>`` (appended, so a
    resumed run continues the same log). Other ranks: console only, warnings and errors only, prefixed with
    the rank. Calling again replaces the handlers this function added (handlers added by others, such as
    pytest's, are left alone), so it is idempotent. Python ``warnings`` are routed into logging as well.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            root.removeHandler(handler)
            handler.close()

    if rank == 0:
        root.setLevel(level)
        formatter = logging.Formatter(LOG_FORMAT)
    else:
        root.setLevel(max(level, logging.WARNING))
        formatter = logging.Formatter(f"[rank {rank}] {LOG_FORMAT}")

    console = TqdmLoggingHandler()
    console.setFormatter(formatter)
    setattr(console, _HANDLER_TAG, True)
    root.addHandler(console)

    if rank == 0 and output_dir is not None:
        log_dir = Path(output_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_dir / log_name, mode="a", encoding="utf-8")
        file_handler.setFormatter(formatter)
        setattr(file_handler, _HANDLER_TAG, True)
        root.addHandler(file_handler)

    logging.captureWarnings(True)
