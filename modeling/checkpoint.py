"""Reading checkpoint files safely and comparing state dicts key by key.

Files are read with ``torch.load(weights_only=True, map_location="cpu")``: tensors and plain containers only, so
a hostile pickle cannot run code. The one class allow-listed on top is ``argparse.Namespace``, because the
reference SAM-Med3D training script stores its arguments that way (``args``) next to the weights.
"""
from __future__ import annotations

import argparse
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

logger = logging.getLogger(__name__)

# How many names of each kind a mismatch report lists before summarising the rest.
REPORT_LIMIT = 20
# Wrapper prefixes stripped from every key when all keys carry them: DistributedDataParallel / DataParallel
# ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file and the problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (also a FileNotFoundError)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not match the model (see ``StateDictDiff``)."""


@dataclass
class StateDictDiff:
    """Differences between a checkpoint's state dict and a model's (each list sorted)."""

    missing: list[str] = field(default_factory=list)        # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)     # in the checkpoint, not in the model
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = REPORT_LIMIT) -> str:
        """Multi-line summary: counts, then the first ``limit`` names of each kind."""
        def block(title: str, items: list[str]) -> list[str]:
            if not items:
                return []
            lines = [f"  {title} ({len(items)}):"] + [f"    {item}" for item in items[:limit]]
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")
            return lines

        shapes = [f"{key}: checkpoint {'×'.join(map(str, c)) or 'scalar'} vs model {'×'.join(map(str, m)) or 'scalar'}"
                  for key, c, m in self.mismatched]
        return "\n".join(block("missing keys (in the model, not in the file)", self.missing)
                         + block("unexpected keys (in the file, not in the model)", self.unexpected)
                         + block("shape mismatches", shapes))


def diff_state_dicts(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> StateDictDiff:
    """Compare a checkpoint state dict (``source``) with a model's (``target``) by key and shape."""
    diff = StateDictDiff(missing=sorted(set(target) - set(source)), unexpected=sorted(set(source) - set(target)))
    for key in sorted(set(source) & set(target)):
        if tuple(source[key].shape) != tuple(target[key].shape):
            diff.mismatched.append((key, tuple(source[key].shape), tuple(target[key].shape)))
    return diff


def read_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint file's content with ``weights_only=True`` onto the CPU.

    Raises CheckpointNotFoundError for a missing path and CheckpointError, naming the file, for anything that is
    not a loadable PyTorch file of tensors and plain data (garbage bytes, a truncated file, a pickle that would
    construct arbitrary objects).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path} (expected a .pth file written by torch.save)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the file is not a PyTorch checkpoint of tensors and plain data "
            f"({_weights_only_reason(err)}). Nothing in it was executed. If it is a real checkpoint from a "
            "source you trust, re-save its state dict with torch.save(model.state_dict(), path).") from err
    # A corrupted file can make torch's reader raise nearly any built-in exception (RuntimeError from the zip
    # reader, KeyError/IndexError/UnicodeDecodeError/AssertionError from the unpickler...). weights_only=True has
    # already guaranteed that no code ran, so every such failure means the same thing to the user.
    except Exception as err:  # noqa: BLE001 - re-raised with the file name, never swallowed
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                              f"{first_error_line(err)})") from err


def first_error_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "no details"


def _weights_only_reason(err: BaseException) -> str:
    """The informative line of torch's weights_only refusal (its text also suggests weights_only=False: not here)."""
    for line in str(err).splitlines():
        line = line.strip()
        if line.startswith(("Unsupported", "Trying to", "Can only", "Unexpected")):
            return line[:300]
    return "it contains objects the safe loader does not allow"


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP/DataParallel ``module.`` and torch.compile ``_orig_mod.`` prefixes carried by every key (torch's
    ``consume_prefix_in_state_dict_if_present`` renames; a prefix only some keys carry is a real parameter name and
    stays)."""
    result = dict(state_dict)
    changed = True
    while changed and result:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in result):
                consume_prefix_in_state_dict_if_present(result, prefix)
                logger.info("stripped the '%s' prefix from %d checkpoint keys", prefix, len(result))
                changed = True
    return result


def as_state_dict(value: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    """Check that ``value`` is a mapping of str -> Tensor; CheckpointError naming the file otherwise."""
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{path}: {what} should be a state dict (parameter name -> tensor), "
                              f"found {type(value).__name__}")
    bad = [str(k) for k, v in value.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: {what} should map parameter names to tensors; {len(bad)} entries do not, "
                              f"e.g. {', '.join(bad[:5])}")
    return dict(value)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel (``.module``) or torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
