"""Hard-case sampling: training scans drawn in proportion to how badly the model still does on them.

With a few dozen scans and a few hundred steps, a kind of bleed seen in one training scan (one subdural crescent
among twelve bleeds) gets one crop per epoch and stays unlearnt: on the learning benchmark's thick-slice cohort the
model never fitted its only training crescent and missed the validation crescent with it; listing that one scan
three times found both. This is the general form of that fix, in the spirit of online hard example mining at the
level of scans: each scan's recent training loss (an exponential moving average over the epochs it was drawn in)
sets its share of the next epoch's draws. Scans are ranked within their stratum (ICH-positive, ICH-negative), which
keeps its share of the draws: ranked against positives, whose loss carries a Dice term, negatives were hardly drawn
and false positives grew (a CT-ICH-like cohort: negatives predicted empty 9/12 → 7/12 over three seeds). Within a
stratum a ``fraction`` f of its draws follow the losses and the rest stay uniform, so f < 1 keeps easy scans in view.

Measured on the learning benchmark's four cohorts it trades them: the thick-slice cohort's crescent is found with
every seed, the other cohorts lose 0.01-0.03 Dice (bench/results/learning_bench.md), so it is off by default.

The weights change only between epochs (the sampler's order for an epoch is fixed at its start, so a run resumed
mid-epoch replays the same order); losses seen during an epoch are pooled over every rank at its end.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

# Weight of an epoch's mean loss in a scan's running loss: a scan is drawn about once per epoch, so the average
# spans the last few visits (crops of one scan differ: blood-centred or not, augmented), not the whole run.
LOSS_MOMENTUM = 0.5


class HardCaseSampling:
    """Per-scan running training loss and the sampling weights it gives, in ``case_ids`` order."""

    def __init__(self, case_ids: Sequence[str], fraction: float, strata: Sequence[int] | None = None,
                 momentum: float = LOSS_MOMENTUM) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"hard case fraction must be in [0, 1], got {fraction}")
        if not case_ids:
            raise ValueError("hard case sampling needs at least one training scan")
        if strata is not None and len(strata) != len(case_ids):
            raise ValueError(f"{len(strata)} strata for {len(case_ids)} scans")
        self.case_ids = list(case_ids)
        self.strata = np.asarray(strata if strata is not None else [0] * len(case_ids))
        self.fraction, self.momentum = fraction, momentum
        self.running: dict[str, float] = {}
        self.pending: list[tuple[str, float]] = []

    def record(self, case_ids: Iterable[str], losses: Iterable[float]) -> None:
        """The per-sample training losses of one micro-batch (non-finite ones are ignored)."""
        self.pending.extend((str(c), float(v)) for c, v in zip(case_ids, losses) if math.isfinite(float(v)))

    def end_epoch(self, gather: Callable[[list[tuple[str, float]]], list[tuple[str, float]]] | None = None) -> None:
        """Fold the epoch's losses into the running ones. ``gather``: a function returning every rank's records
        (``RankGroup.gather``), so all ranks hold the same weights; None for a single process."""
        records = gather(self.pending) if gather is not None else self.pending
        sums: dict[str, list[float]] = {}
        for case_id, loss in records:
            sums.setdefault(case_id, []).append(loss)
        for case_id, losses in sums.items():
            mean = float(np.mean(losses))
            old = self.running.get(case_id)
            self.running[case_id] = mean if old is None else self.momentum * mean + (1 - self.momentum) * old
        self.pending = []

    def weights(self) -> np.ndarray:
        """Probability of each scan per draw. A stratum of n of the N scans keeps n / N of the draws, spread as
        (1 - f) / n + f · loss / Σ loss over its scans. A scan not drawn yet counts with its stratum's largest
        running loss (it may be the hard one); before any loss is known the draws are uniform. (Squared losses,
        which favour the hardest scan more, found the thick-slice cohort's crescent no more often and doubled the
        CT-ICH-like cohort's false positives.)"""
        n = len(self.case_ids)
        weights = np.full(n, 1.0 / n)
        if not self.running or self.fraction == 0:
            return weights
        for stratum in np.unique(self.strata):
            members = np.flatnonzero(self.strata == stratum)
            known = [self.running[self.case_ids[i]] for i in members if self.case_ids[i] in self.running]
            if not known:
                continue
            unseen = max(known)
            losses = np.array([max(self.running.get(self.case_ids[i], unseen), 0.0) for i in members])
            if losses.sum() > 0:
                share = len(members) / n
                weights[members] = share * ((1 - self.fraction) / len(members) + self.fraction * losses / losses.sum())
        return weights

    def state_dict(self) -> dict[str, Any]:
        """Plain data for checkpoints (loads with ``torch.load(weights_only=True)``)."""
        return {"running": dict(self.running), "pending": [list(r) for r in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running = {str(k): float(v) for k, v in state["running"].items()}
        self.pending = [(str(c), float(v)) for c, v in state["pending"]]
