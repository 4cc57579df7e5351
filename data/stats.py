"""Dataset statistics: per-scan facts gathered while validation reads each file (``scan_stats``), and the cohort
summary written to ``dataset_stats.json`` and logged as a table."""
from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

import numpy as np

from config import DataConfig
from data.io import load_image_file, load_mask_file, resolve_spacing
from data.preprocess import preprocessed_shape
from data.records import Case, Cohort

# HU histogram kept per scan for the dataset statistics: 1-HU bins, every 4th voxel (percentiles need no more).
_HIST_LOW, _HIST_HIGH, _HIST_STRIDE = -1024, 3072, 4


def scan_stats(volume: np.ndarray, blood_voxels: int, spacing: Sequence[float], spacing_source: str, split: str,
               ich: int) -> dict[str, Any]:
    """The facts of one scan kept for the statistics: split, label, shape, spacing and its source, HU range and
    histogram, blood voxels and mL, foreground fraction."""
    sample = np.clip(np.rint(volume.ravel()[::_HIST_STRIDE]), _HIST_LOW, _HIST_HIGH - 1)
    histogram = np.bincount((sample - _HIST_LOW).astype(np.int64), minlength=_HIST_HIGH - _HIST_LOW)
    return {
        "split": split,
        "ich": int(ich),
        "shape": [int(s) for s in volume.shape],
        "spacing": [float(s) for s in spacing],
        "spacing_source": spacing_source,
        "hu_min": float(volume.min()),
        "hu_max": float(volume.max()),
        "blood_voxels": int(blood_voxels),
        "blood_ml": blood_voxels * float(np.prod(spacing)) / 1000.0,
        "foreground_fraction": blood_voxels / volume.size,
        "hu_histogram": histogram,
    }


def _stats_for_case(case: Case, split: str, data_config: DataConfig) -> dict[str, Any]:
    """Read a case whose statistics were not gathered by validate_cohort (e.g. a hand-built Cohort)."""
    volume, meta = load_image_file(case.image_path)
    blood = 0
    if case.mask_path:
        blood = int(np.count_nonzero(load_mask_file(case.mask_path)))
    spacing, source = resolve_spacing(meta["spacing"], None, data_config.spacing)
    if case.spacing is not None:
        spacing, source = case.spacing, case.spacing_source or source
    return scan_stats(volume, blood, spacing, source, split, case.ich)


def _percentile_from_histogram(histogram: np.ndarray, q: float) -> float:
    cumulative = np.cumsum(histogram)
    index = int(np.searchsorted(cumulative, q / 100.0 * cumulative[-1], side="left"))
    return float(_HIST_LOW + min(index, histogram.size - 1))


def _summary(values: Sequence[float]) -> dict[str, float]:
    """{min, median, max} of scalars ({} for none)."""
    if not len(values):
        return {}
    array = np.asarray(values, dtype=np.float64)
    return {"min": float(array.min()), "median": float(np.median(array)), "max": float(array.max())}


def _axis_summary(triples: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """{min, median, max} per axis of 3-vectors (shapes, spacings) ({} for none)."""
    if not len(triples):
        return {}
    array = np.asarray(triples, dtype=np.float64)
    return {"min": array.min(axis=0).tolist(), "median": np.median(array, axis=0).tolist(),
            "max": array.max(axis=0).tolist()}


def compute_dataset_stats(cohort: Cohort, data_config: DataConfig) -> dict[str, Any]:
    """Statistics of the cohort as a JSON-ready dict (the trainer writes it to dataset_stats.json).

    Keys: ``splits`` (scans / positive / negative / patients for train, val, all); ``shape``, ``spacing_mm`` and
    ``preprocessed_shape`` ({min, median, max} per axis); ``spacing_sources`` (counts of image / mask_header /
    fallback); ``hu_percentiles`` (p0.5..p99.5 from 1-HU bins over every 4th voxel, values clipped to
    [-1024, 3071]); ``hemorrhage_ml`` over scans whose mask has blood (count, sum, median, min, max: mask voxels ×
    voxel volume at the original spacing); ``foreground_fraction`` (overall blood / all voxels, and {min, median,
    max} per scan with blood); ``cases`` (the per-scan numbers). Reuses what validate_cohort read and only reads
    cases it has no statistics for.
    """
    rows = []
    histogram = np.zeros(_HIST_HIGH - _HIST_LOW, dtype=np.int64)
    for split, cases in (("train", cohort.train), ("val", cohort.val)):
        for case in cases:
            stats = cohort.case_stats.get(case.case_id) or _stats_for_case(case, split, data_config)
            histogram += stats["hu_histogram"]
            grid = preprocessed_shape(stats["shape"], stats["spacing"], data_config.target_spacing)
            rows.append((case, {**{k: v for k, v in stats.items() if k != "hu_histogram"},
                                "preprocessed_shape": list(grid)}))

    def counts(selected: list[tuple[Case, dict[str, Any]]]) -> dict[str, int]:
        return {"scans": len(selected), "positive": sum(c.ich == 1 for c, _ in selected),
                "negative": sum(c.ich == 0 for c, _ in selected),
                "patients": len({c.patient_id for c, _ in selected})}

    bleeding = [s for _, s in rows if s["blood_voxels"] > 0]
    total_voxels = sum(int(np.prod(s["shape"])) for _, s in rows)
    hu = ({f"p{q:g}": _percentile_from_histogram(histogram, q) for q in (0.5, 1, 5, 25, 50, 75, 95, 99, 99.5)}
          if histogram.sum() else {})
    return {
        "n_scans": len(rows),
        "splits": {"train": counts([r for r in rows if r[1]["split"] == "train"]),
                   "val": counts([r for r in rows if r[1]["split"] == "val"]),
                   "all": counts(rows)},
        "shape": _axis_summary([s["shape"] for _, s in rows]),
        "spacing_mm": _axis_summary([s["spacing"] for _, s in rows]),
        "spacing_sources": dict(sorted(collections.Counter(s["spacing_source"] for _, s in rows).items())),
        "target_spacing_mm": [float(s) for s in data_config.target_spacing],
        "preprocessed_shape": _axis_summary([s["preprocessed_shape"] for _, s in rows]),
        "hu_percentiles": hu,
        "hemorrhage_ml": {"scans": len(bleeding), "sum": float(sum(s["blood_ml"] for s in bleeding)),
                          **_summary([s["blood_ml"] for s in bleeding])},
        "foreground_fraction": {
            "overall": sum(s["blood_voxels"] for _, s in rows) / total_voxels if total_voxels else 0.0,
            **_summary([s["foreground_fraction"] for s in bleeding])},
        "cases": [{"case_id": c.case_id, "patient_id": c.patient_id, **s} for c, s in rows],
    }


def format_stats_table(stats: Mapping[str, Any]) -> str:
    """A short multi-line table of ``compute_dataset_stats`` output (also after a JSON round trip) for the log."""

    def triple(summary: Mapping[str, Sequence[float]], fmt: str) -> str:
        if not summary:
            return "-"
        return " / ".join("×".join(format(v, fmt) for v in summary[key]) for key in ("min", "median", "max"))

    lines = [f"{'split':<8}{'scans':>7}{'ICH+':>7}{'ICH-':>7}{'patients':>10}"]
    for split in ("train", "val", "all"):
        c = stats["splits"][split]
        lines.append(f"{split:<8}{c['scans']:>7}{c['positive']:>7}{c['negative']:>7}{c['patients']:>10}")
    target = "×".join(f"{s:g}" for s in stats["target_spacing_mm"])
    lines += [
        f"shape       (min / median / max)  {triple(stats['shape'], '.0f')}",
        f"spacing mm  (min / median / max)  {triple(stats['spacing_mm'], '.3g')}",
        "spacing from                      " + ", ".join(f"{k} {v}" for k, v in stats["spacing_sources"].items()),
        f"at {target} mm (min / median / max)  {triple(stats['preprocessed_shape'], '.0f')}",
    ]
    if stats["hu_percentiles"]:
        lines.append("HU percentiles                    "
                     + "  ".join(f"{k} {v:.0f}" for k, v in stats["hu_percentiles"].items()))
    blood = stats["hemorrhage_ml"]
    lines.append(f"hemorrhage mL ({blood['scans']} scans with blood)  "
                 + (f"sum {blood['sum']:.1f}  median {blood['median']:.1f}  range {blood['min']:.1f}-{blood['max']:.1f}"
                    if blood["scans"] else "none"))
    fraction = stats["foreground_fraction"]
    lines.append(f"foreground fraction               overall {fraction['overall']:.2e}"
                 + (f"  median per scan with blood {fraction['median']:.2e}" if "median" in fraction else ""))
    return "\n".join(lines)
