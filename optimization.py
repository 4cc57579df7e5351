"""How the optimiser is set up and steered: learning-rate groups, the per-epoch schedule, early stopping and the
size of each accumulation group. Pure decisions, unit-tested without a model (tests/test_trainer_parts.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from config import Config


def cosine_warmup_factor(epoch: int, warmup_epochs: int, total_epochs: int, min_factor: float = 0.01) -> float:
    """LR multiplier for ``epoch`` (0-based): linear warm-up to 1, then cosine decay to ``min_factor``."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    span = max(total_epochs - warmup_epochs, 1)
    progress = min(max(epoch - warmup_epochs, 0) / span, 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LRScheduler | \
        torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The per-epoch LR schedule named by ``--scheduler_type``; plateau is keyed on validation Dice (mode max)."""
    t = config.train
    if t.scheduler_type == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: cosine_warmup_factor(epoch, t.warmup_epochs, t.epochs))
    if t.scheduler_type == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_size, gamma=t.lr_decay_factor)
    if t.scheduler_type == "reduce_on_plateau":
        # Reduce well before early stopping gives up, so a lower rate gets a chance to help.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=t.lr_decay_factor,
                                                          patience=max(1, t.patience // 3))
    raise ValueError(f"unknown scheduler_type {t.scheduler_type!r}; expected cosine, step or reduce_on_plateau")


@dataclasses.dataclass
class EarlyStopping:
    """Stop after ``patience`` validations without an improvement of the monitored metric (higher is better).

    Patience only counts once the metric has passed ``learning_threshold``: a model trained from scratch scores
    0 for the first epochs of a cold start (measured: 25-35 epochs of Dice 0 on a small-bleed cohort before it
    learned), and stopping there kept the untrained epoch-1 model as "best".
    """

    patience: int
    min_delta: float = 0.0
    learning_threshold: float = 0.05
    best: float = -math.inf
    best_epoch: int = -1
    bad_validations: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record a validation result; returns True when it is a new best."""
        if not math.isnan(value) and value > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_validations = value, epoch, 0
            return True
        if self.best > self.learning_threshold:
            self.bad_validations += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_validations >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# Which learning rate each top-level module of a SamMed3D trains at (see parameter_groups).
_ENCODER_MODULES = ("image_encoder",)
_DECODER_MODULES = ("prompt_encoder", "mask_decoder")
_SCRATCH_MODULES = ("refiner", "representation_head")


def parameter_groups(model: nn.Module, config: Config) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters, named ``encoder`` (``--lr``), ``decoder`` (prompt
    encoder and mask decoder, ``--lr × --decoder_lr_scale``) and ``scratch`` (mask refiner and representation
    head, which start from zero or random even when fine-tuning: ``--scratch_lr``). Empty groups are left out;
    every trainable parameter is in exactly one group (a module this table does not know is an error)."""
    t = config.train
    rates = {"encoder": t.lr, "decoder": t.lr * t.decoder_lr_scale, "scratch": t.scratch_lr}
    members: dict[str, list[nn.Parameter]] = {name: [] for name in rates}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        top = name.split(".", 1)[0]
        group = ("encoder" if top in _ENCODER_MODULES else "decoder" if top in _DECODER_MODULES
                 else "scratch" if top in _SCRATCH_MODULES else None)
        if group is None:
            raise ValueError(f"parameter {name} belongs to no learning-rate group (module {top!r})")
        members[group].append(parameter)
    return [{"name": name, "params": params, "lr": rates[name]} for name, params in members.items() if params]


def group_sizes(num_batches: int, accumulation: int) -> list[int]:
    """Micro-batches in each optimiser step of an epoch; the last group may be short and still steps."""
    full, rest = divmod(num_batches, accumulation)
    return [accumulation] * full + ([rest] if rest else [])
