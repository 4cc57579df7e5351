"""Run support: seeding and RNG state, crash-safe file writes, devices and system checks, checkpoint retention,
logging. (What a run reports — summaries, metrics table, pictures — is in ``reporting.py``; memory in
``memory.py``.)

Every function takes plain arguments (paths, numbers, dicts) so it can be used without a Config. Nothing here runs
at import time. Memory sizes are reported in GB meaning 2**30 bytes (what ``nvidia-smi`` and ``free -g`` call GiB).
"""
from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import logging
import os
import platform
import random
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

import numpy as np
import psutil
import torch

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


# errno values that mean "no space left": the disk is full, or the user's quota is.
DISK_FULL_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)


class DiskFullError(OSError):
    """An atomic write ran out of disk space; the file at its path still holds its previous content. The message is
    one line: the file, how much to free and on which file system."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        # One positional argument suffices, so a DataLoader worker can re-raise it in the main process.
        super().__init__(errno.ENOSPC, message, None if path is None else str(path))
        self.message = message

    def __str__(self) -> str:
        return self.message


def _disk_full_cause(error: BaseException | None) -> OSError | None:
    """The out-of-space OSError behind ``error``, if any: torch.save reports a failed write as a RuntimeError
    ("unexpected pos") whose context is the OSError, so the whole chain is searched."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    current = _existing_ancestor(Path(path))
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return current


def _disk_full_error(path: Path, expected_bytes: int) -> DiskFullError:
    mount = mount_point(path)
    free = shutil.disk_usage(mount).free
    # Room for this file and one more like it: latest_model.pth and best_model.pth are often written together.
    needed = max(2 * expected_bytes - free, expected_bytes, 1)

    def size(n_bytes: float) -> str:
        return f"{n_bytes / GB:.1f} GB" if n_bytes >= 0.1 * GB else f"{n_bytes / 2**20:.0f} MB"

    return DiskFullError(f"disk full while writing {path}: free {size(needed)} on {mount} (the file takes about "
                         f"{size(expected_bytes)}, {size(free)} is free there); {path.name} still holds its previous "
                         "content", path)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike, binary: bool, expected_bytes: int = 0) -> Iterator[IO]:
    """Yield a temporary file next to ``path``; on success it replaces ``path`` in one rename.

    If the body raises (or the process is interrupted), the temporary file is deleted and whatever was at
    ``path`` before is left untouched. Running out of disk space raises DiskFullError, one line saying how much
    to free where (``expected_bytes``: the size the file will have, else the previous file's or what was written).
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
    except BaseException as error:
        # Clean up and re-raise: a failed save must not leave a half-written temp file behind.
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(error, DiskFullError) or _disk_full_cause(error) is None:
            raise
        previous = path.stat().st_size if path.is_file() else 0
        raise _disk_full_error(path, expected_bytes or previous or written) from error
    _fsync_directory(path.parent)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested checkpoint dict/list: about the size torch.save will write."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a truncated file at ``path`` (temp file + fsync + ``os.replace``);
    DiskFullError when the disk fills up."""
    with _atomic_file(path, binary=True, expected_bytes=_tensor_bytes(obj)) as handle:
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
# Logging
# ---------------------------------------------------------------------------------------------------------------

_HANDLER_TAG = "_ichseg_handler"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(output_dir: str | os.PathLike | None, rank: int = 0, level: int = logging.INFO,
                  log_name: str = "train.log") -> None:
    """Configure the root logger for a training or prediction process.

    Rank 0: console (stderr) and, when ``output_dir`` is given, ``<output_dir>/<log_name>`` (appended, so a
    resumed run continues the same log). Other ranks: console only, warnings and errors only, prefixed with the
    rank. Calling again replaces the handlers this function added (handlers added by others, such as pytest's, are
    left alone), so it is idempotent. Python ``warnings`` are routed into logging as well.

    While progress bars run, wrap the loop in ``tqdm.contrib.logging.logging_redirect_tqdm()``: it routes the
    console handler through ``tqdm.write`` so log lines do not break the bars, and leaves the file handler alone.
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

    console = logging.StreamHandler()  # sys.stderr, which logging_redirect_tqdm recognises as the console
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


@contextlib.contextmanager
def stop_signals_to(handler: Callable[[int], None]) -> Iterator[None]:
    """Inside the block, SIGINT and SIGTERM call ``handler(signum)``; the previous handlers come back after it.
    Python delivers signals to the main thread only, so elsewhere (a run started from a worker thread) this does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda signum, _frame: handler(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
