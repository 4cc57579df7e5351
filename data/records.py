"""What cohort validation produces (``Case``, ``Cohort``) and how it reports problems (``Problem``,
``DataValidationError``): the records shared by validation, statistics, the cache and the loaders."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class Problem:
    """One validation finding: the file, the CSV row it came from (its line in the file, header = line 1) and what
    is wrong."""

    file: str
    message: str
    csv: str | None = None
    row: int | None = None

    def __str__(self) -> str:
        where = f"{Path(self.csv).name} row {self.row}: " if self.csv is not None and self.row is not None else ""
        return f"{where}{self.file}: {self.message}"


class DataValidationError(ValueError):
    """The cohort cannot be used; ``problems`` lists every problem found (file, row, problem)."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"the cohort has {len(self.problems)} problem(s); fix them before training:\n{lines}")


@dataclass(frozen=True)
class Case:
    """One scan of the cohort.

    The first seven fields are the shared contract; the rest are filled by ``validate_cohort`` from what it read,
    so that loading never has to re-derive them: ``spacing`` (mm, image axis order) and where it came from
    (``"image"`` = pkl dict / image header, ``"mask_header"``, ``"fallback"`` = DataConfig.spacing),
    ``mask_axes`` and ``mask_flips`` (the transpose, then the image axes to flip, that bring the mask into the
    image's voxel grid: ``data.geometry.orient_mask``) and ``fingerprint`` (content hash of the image and mask
    bytes, part of the cache key).
    """

    image_path: str
    mask_path: str | None
    ich: int
    patient_id: str
    case_id: str
    csv_path: str
    row: int
    spacing: tuple[float, float, float] | None = None
    spacing_source: str | None = None
    mask_axes: tuple[int, int, int] = (0, 1, 2)
    fingerprint: str | None = None
    mask_flips: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class Cohort:
    """Validated train and val cases in CSV order, the warnings found, and per-case facts gathered while reading
    (``case_stats[case_id]``: shape, spacing, HU histogram, blood volume, ...) so statistics need no second read."""

    train: list[Case]
    val: list[Case]
    warnings: list[str]
    case_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
