"""Reporting a run: the training summary (JSON), the metrics table (CSV), time left, and the pictures
(learning curves, validation overlays, predict.py's volume agreement).

Every function takes plain arguments (paths, numbers, dicts) so it can be used without a Config. matplotlib is
optional at import: it is imported inside the plotting functions and only through its object API (``Figure`` +
``FigureCanvasAgg``), so no global pyplot state or backend switch is involved. Files are written atomically.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import datetime as dt
import enum
import io
import json
import logging
import math
import os
from pathlib import Path, PurePath
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

import metrics
from utils import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

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


def format_number(value: float | None, digits: int = 3) -> str:
    """A number of a report table or log line: ``digits`` decimals, "n/a" for a missing or non-finite value, never
    "-0.000"."""
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def epoch_line(record: Mapping[str, Any], epochs: int, remaining_s: float, improved: bool) -> str:
    """The training log's line for one finished epoch (``record``: the epoch's history entry)."""
    clicks = "/".join(format_number(record.get(f"val_dice_{k}click"), 4) for k in (1, 3, 5))
    return (f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}  val Dice "
            f"{format_number(record.get('val_dice'), 4)} (clicks 1/3/5: {clicks})  lr {record['lr']:.2e}  "
            f"{format_duration(record['epoch_time_s'])} (data wait {100 * record.get('data_wait_fraction', 0.0):.0f}%)"
            f"  ETA {format_duration(remaining_s)}{'  (new best)' if improved else ''}")


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
# Tables: metrics.csv, predictions.csv
# ---------------------------------------------------------------------------------------------------------------

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
    raise ValueError(f"CSV cells must be numbers, strings or None, got {type(value).__name__}: {value!r}")



def write_table_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], key_column: str) -> None:
    """Write ``rows`` as a CSV atomically: ``key_column`` first (the whole header of an empty table), then columns
    in order of first appearance over all rows (a key that appears later, such as a validation-only metric,
    extends the header), missing cells empty, floats in their shortest exact form (a NaN loss stays visible)."""
    columns = list(dict.fromkeys([key_column, *(str(key) for row in rows for key in row)]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _format_csv_value(row.get(key)) for key in columns})
    atomic_write_text(path, buffer.getvalue())


def write_metrics_csv(path: str | os.PathLike, history: Sequence[Mapping[str, Any]]) -> None:
    """``metrics.csv``: one row per epoch, rewritten from the trainer's checkpointed ``history`` after every
    epoch. A resumed run restores the history with the checkpoint, so the table never holds epochs the
    checkpoint does not (and needs no truncation); one rewrite per epoch costs nothing next to an epoch."""
    epochs = [row.get("epoch") for row in history]
    if any(later is None or earlier is None or later <= earlier for earlier, later in zip(epochs, epochs[1:])):
        raise ValueError(f"{path}: history epochs must increase, got {epochs}")
    write_table_csv(path, history, key_column="epoch")


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
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def plot_learning_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                         panels: Sequence[tuple[str, str, Sequence[tuple[str, str]]]] = LEARNING_CURVE_PANELS) -> None:
    """Plot per-epoch metrics (one dict per epoch, the trainer's history) into a PNG.

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


def _overlay_array(name: str, array: Any, shape: tuple[int, ...] | None) -> np.ndarray | None:
    """``array`` (numpy or torch, any device) as a D×H×W numpy array of ``shape``; None stays None."""
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
    volume = _overlay_array("image", image, None)
    assert volume is not None
    label_vol = _overlay_array("label", label, volume.shape)
    pred_vol = _overlay_array("prediction", prediction, volume.shape)
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



def plot_volume_agreement(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Scatter of predicted vs true hematoma volume and a Bland–Altman plot (difference vs mean, ±1.96 SD) from
    per-scan rows with ``volume_true_ml`` and ``volume_pred_ml`` (predict.py's evaluation)."""
    rows = list(rows)
    true = np.array([r["volume_true_ml"] for r in rows])
    pred = np.array([r["volume_pred_ml"] for r in rows])
    figure = _new_figure(10, 4.5)
    scatter, bland = figure.subplots(1, 2)
    top = max(float(true.max(initial=0)), float(pred.max(initial=0)), 1.0) * 1.05
    scatter.scatter(true, pred, s=18)
    scatter.plot([0, top], [0, top], "k--", linewidth=1)
    scatter.set(xlabel="true volume (mL)", ylabel="predicted volume (mL)", title="Hematoma volume",
                xlim=(0, top), ylim=(0, top))
    agreement = metrics.bland_altman(true, pred)
    bland.scatter((true + pred) / 2, pred - true, s=18)
    for key, style in (("bias", "-"), ("loa_high", "--"), ("loa_low", "--")):
        bland.axhline(agreement[key], color="k", linestyle=style, linewidth=1)
    bland.set(xlabel="mean of predicted and true (mL)", ylabel="predicted − true (mL)",
              title=f"Bland–Altman (bias {agreement['bias']:+.2f} mL)")
    _save_figure(figure, path, dpi=100)


def plot_dice_by_volume(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Per-scan Dice and HD95 against the true hematoma volume (predict.py's evaluation rows): where the model
    struggles, typically on small bleeds. ICH-negative scans (true volume 0) are drawn at x = 0 in grey."""
    rows = list(rows)
    true = np.array([r["volume_true_ml"] for r in rows], dtype=float)
    positive = true > 0
    figure = _new_figure(10, 4.0)
    for ax, key, label in zip(figure.subplots(1, 2), ("dice", "hd95_mm"), ("Dice", "HD95 (mm)")):
        values = np.array([_finite_or_none(r.get(key)) for r in rows], dtype=float)  # None -> NaN: not drawn
        ax.scatter(true[positive], values[positive], s=20, label="ICH-positive")
        if (~positive).any():
            ax.scatter(true[~positive], values[~positive], s=20, color="grey", label="ICH-negative")
        ax.set(xlabel="true hematoma volume (mL)", ylabel=label, title=f"{label} per scan")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    _save_figure(figure, path, dpi=100)
