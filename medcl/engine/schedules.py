"""Learning-rate schedules: the one factory every training loop uses (pretraining, fine-tuning, MIL heads,
patch-encoder pretraining).

A schedule is a multiplier of the base learning rate per optimiser step: an optional linear warm-up over
``warmup`` steps (``(step + 1) / warmup``), then a decay from 1 to ``min_ratio`` over the remaining steps:

* ``cosine`` -- ``min_ratio + (1 - min_ratio) * (1 + cos(pi t)) / 2`` (Loshchilov & Hutter, 2017);
* ``poly``   -- ``min_ratio + (1 - min_ratio) * (1 - t) ** 0.9`` (nnU-Net's schedule);
* ``constant`` -- 1 after the warm-up;

with ``t = (step - warmup) / (total - warmup)`` clamped to ``[0, 1]``. Schedules are functions of the global
step, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

__all__ = ["ScheduleKind", "lr_factor", "lr_schedule", "make_lr_scheduler"]

ScheduleKind = Literal["cosine", "poly", "constant"]


def lr_factor(step: int, total: int, kind: str = "cosine", warmup: int = 0, min_ratio: float = 0.0) -> float:
    """The learning-rate multiplier at ``step`` of ``total`` (see the module docstring)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    if kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * t))
    elif kind == "poly":
        decay = (1.0 - t) ** 0.9
    elif kind == "constant":
        decay = 1.0
    else:
        raise ValueError(f"unknown learning-rate schedule {kind!r} (cosine, poly or constant)")
    return min_ratio + (1.0 - min_ratio) * decay


def lr_schedule(total: int, kind: str = "cosine", warmup: int = 0, min_ratio: float = 0.0) -> Callable[[int], float]:
    """``step -> multiplier`` for :func:`make_lr_scheduler` (see :func:`lr_factor`)."""
    lr_factor(0, total, kind, warmup, min_ratio)  # fail now on an unknown kind, not at the first step

    def factor(step: int) -> float:
        return lr_factor(step, total, kind, warmup, min_ratio)

    return factor


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, factors: Callable[[int], float] | Sequence[Callable[[int], float]]
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step scheduler multiplying each parameter group's base LR by its factor (one for all, or one per
    group, e.g. ``0`` for a frozen encoder's group)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factors if callable(factors) else list(factors))
