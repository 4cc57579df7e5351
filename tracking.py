"""Experiment tracking: Weights & Biases when asked for and importable, otherwise a no-op with the same methods.

``wandb`` is imported lazily inside ``WandbTracker``, so the rest of the project never pays for (or depends on)
it. Without an API key or without network the run is recorded offline under ``<output_dir>/wandb`` and can be
uploaded later with ``wandb sync``. The mode is passed to ``wandb.init``; no environment variable is written.
"""
from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any, Mapping, Protocol
from urllib.parse import urlparse

from reporting import to_jsonable

logger = logging.getLogger(__name__)

DEFAULT_WANDB_HOST = "https://api.wandb.ai"
WANDB_MODES = ("auto", "online", "offline", "disabled")
# wandb's own older spellings of the same modes, accepted when they come from WANDB_MODE.
_MODE_ALIASES = {"run": "online", "dryrun": "offline"}
_NETWORK_PROBE_TIMEOUT_S = 3.0


class Tracker(Protocol):
    """What the trainer may call on a tracker: ``start`` once (after a resume told it the run id), then
    ``log``/``log_image``, then ``finish`` (safe to call more than once)."""

    @property
    def run_id(self) -> str | None: ...

    def start(self, run_id: str | None = None) -> None: ...

    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def log_image(self, key: str, png_path: str | os.PathLike, step: int, caption: str | None = None) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


class NullTracker:
    """Tracking switched off (or wandb unavailable): every call does nothing."""

    @property
    def run_id(self) -> str | None:
        return None

    def start(self, run_id: str | None = None) -> None:
        return None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        return None

    def log_image(self, key: str, png_path: str | os.PathLike, step: int, caption: str | None = None) -> None:
        return None

    def finish(self, exit_code: int = 0) -> None:
        return None

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        return None


def has_wandb_api_key(base_url: str | None = None) -> bool:
    """True when ``WANDB_API_KEY`` is set or the netrc file has an entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(base_url or os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_HOST).hostname
    netrc_path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    if not host or not netrc_path.is_file():
        return False
    try:
        return netrc.netrc(netrc_path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError) as err:
        logger.warning("could not read %s (%s); treating wandb as not logged in", netrc_path, err)
        return False


def wandb_host_reachable(base_url: str | None = None, timeout_s: float = _NETWORK_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the wandb API host can be opened within ``timeout_s``."""
    parsed = urlparse(base_url or os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_HOST)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not parsed.hostname:
        return False
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_wandb_mode(requested: str = "auto") -> str:
    """Pick the wandb mode: an explicit request wins; "auto" follows WANDB_MODE when set, else goes online only
    with an API key and a reachable host, and offline otherwise."""
    if requested not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {', '.join(WANDB_MODES)}, got {requested!r}")
    if requested != "auto":
        return requested
    from_env = os.environ.get("WANDB_MODE", "").strip().lower()
    if from_env:
        mode = _MODE_ALIASES.get(from_env, from_env)
        if mode not in WANDB_MODES[1:]:
            raise ValueError(f"WANDB_MODE={from_env!r} is not a wandb mode; expected online, offline or disabled")
        return mode
    if not has_wandb_api_key():
        logger.info("no wandb API key (WANDB_API_KEY or netrc): recording the run offline")
        return "offline"
    if not wandb_host_reachable():
        logger.warning("wandb host unreachable: recording the run offline (upload later with `wandb sync`)")
        return "offline"
    return "online"


class WandbTracker:
    """One wandb run, stored under ``<output_dir>/wandb``.

    Construction records the settings; ``start()`` creates (or, given the ``run_id`` saved in a checkpoint,
    resumes) the run, so a trainer can build the tracker first and start it once it knows whether it resumes.
    ``finish()`` also shuts down wandb's background service process so nothing outlives the training.
    """

    def __init__(self, project: str, entity: str | None, config: Mapping[str, Any], output_dir: str | os.PathLike,
                 run_id: str | None = None, mode: str = "auto", run_name: str | None = None) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
        self.project, self.entity, self.run_name = project, entity, run_name
        self.config = to_jsonable(dict(config), "config")  # fail now, not inside wandb, on unconvertible values
        self.output_dir = Path(output_dir)
        self.requested_mode = mode
        self.mode: str | None = None  # the mode actually used, known after start()
        self._initial_run_id = run_id
        self._run: Any = None
        self._wandb: Any = None
        self._finished = False

    def start(self, run_id: str | None = None) -> None:
        """Create the run, or resume run ``run_id`` (default: the one given at construction)."""
        if self._run is not None:
            raise RuntimeError(f"wandb run {self._run.id} already started")
        if self._finished:
            raise RuntimeError("WandbTracker.start called after finish()")
        import wandb  # lazy: optional dependency, and slow to import

        self._wandb = wandb
        run_id = run_id or self._initial_run_id
        self.mode = resolve_wandb_mode(self.requested_mode)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        init_kwargs: dict[str, Any] = dict(
            project=self.project, entity=self.entity, config=self.config, dir=str(self.output_dir),
            name=self.run_name, id=run_id, resume="allow" if run_id else None,
            # Our own train.log already has the console; wandb's capture would wrap stdout/stderr under tqdm.
            settings=wandb.Settings(console="off", silent=True),
        )
        try:
            self._run = wandb.init(mode=self.mode, **init_kwargs)
        except wandb.errors.Error as err:
            if self.mode != "online":
                raise
            logger.warning("wandb online start failed (%s); recording the run offline instead", err)
            self.mode = "offline"
            self._run = wandb.init(mode=self.mode, **init_kwargs)
        logger.info("wandb run %s (%s%s) in %s", self._run.id, self.mode, ", resumed" if run_id else "",
                    self.output_dir / "wandb")

    @property
    def run_id(self) -> str | None:
        """The wandb run id (save it in checkpoints); None before ``start()``."""
        return None if self._run is None else self._run.id

    @property
    def run_dir(self) -> Path | None:
        """The run's folder, e.g. ``<output_dir>/wandb/offline-run-<time>-<id>``; None before ``start()``."""
        directory = getattr(self._run, "dir", None)  # <run folder>/files
        return Path(directory).parent if directory else None

    def _active_run(self, method: str) -> Any:
        if self._finished:
            raise RuntimeError(f"WandbTracker.{method} called after finish()")
        if self._run is None:
            raise RuntimeError(f"WandbTracker.{method} called before start()")
        return self._run

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log metrics at ``step``: tensors and numpy scalars become numbers, None values are dropped,
        NaN/inf are passed through (wandb shows them)."""
        run = self._active_run("log")
        clean: dict[str, Any] = {}
        for key, value in metrics.items():
            if value is None:
                continue
            clean[str(key)] = value if isinstance(value, float) else to_jsonable(value, f"metrics[{key!r}]")
        if clean:
            run.log(clean, step=int(step))

    def log_image(self, key: str, png_path: str | os.PathLike, step: int, caption: str | None = None) -> None:
        """Attach the PNG at ``png_path`` as image ``key`` at ``step``."""
        run = self._active_run("log_image")
        path = Path(png_path)
        if not path.is_file():
            raise FileNotFoundError(f"image to log not found: {path}")
        run.log({key: self._wandb.Image(str(path), caption=caption)}, step=int(step))

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (a non-zero ``exit_code`` marks it failed) and stop wandb's service; idempotent, and a
        no-op for a tracker that never started."""
        if self._finished:
            return
        self._finished = True
        if self._run is None:
            return
        self._run.finish(exit_code=exit_code)
        # wandb keeps a per-process service (wandb-core) alive after finish(); stop it so no child process lingers.
        self._wandb.teardown(exit_code=exit_code)

    def __enter__(self) -> "WandbTracker":
        if self._run is None:
            self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def build_tracker(enabled: bool, project: str, entity: str | None, config: Mapping[str, Any],
                  output_dir: str | os.PathLike, run_id: str | None = None, mode: str = "auto",
                  run_name: str | None = None) -> WandbTracker | NullTracker:
    """A ``WandbTracker`` (not yet started: call ``start()``) when ``enabled`` and wandb imports, else a
    ``NullTracker`` (with a warning when wandb was wanted but is missing)."""
    if not enabled:
        return NullTracker()
    try:
        import wandb  # noqa: F401 - only checking that it can be imported
    except ImportError as err:
        logger.warning("wandb requested but cannot be imported (%s); continuing without tracking", err)
        return NullTracker()
    return WandbTracker(project=project, entity=entity, config=config, output_dir=output_dir, run_id=run_id,
                        mode=mode, run_name=run_name)
