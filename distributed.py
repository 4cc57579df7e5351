"""The few collectives training needs, as one object that is a no-op with a single process.

Validation gathers per-scan rows from every rank, the loss vote and the stop vote reduce one number: a
``RankGroup(world_size=1)`` returns its input unchanged, so the trainer has one code path for one process and many.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


class RankGroup:
    """The ranks of a torchrun job (``torch.distributed`` initialised) or a single process (``world_size == 1``)."""

    def __init__(self, world_size: int, device: torch.device) -> None:
        self.world_size = world_size
        self.device = device

    def gather(self, values: list[Any]) -> list[Any]:
        """Every rank's ``values`` concatenated in rank order (picklable objects)."""
        if self.world_size == 1:
            return values
        gathered: list[list[Any]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(gathered, values)
        return [v for part in gathered for v in part]

    def gather_cases(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """All ranks' per-scan rows, each ``case_id`` once: the validation DistributedSampler repeats a few scans
        to even the shards when len(val) is not a multiple of the world size. Same order on every rank."""
        unique: dict[str, dict[str, Any]] = {}
        for row in self.gather(rows):
            unique.setdefault(row["case_id"], row)
        return list(unique.values())

    def all_true(self, flag: bool) -> bool:
        """``flag`` AND-ed over the ranks."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return bool(tensor.item())

    def max_int(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int32, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (NaN stays NaN without a collective: every rank sees the same)."""
        if self.world_size == 1 or math.isnan(value):
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size
