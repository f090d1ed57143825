"""Learning-rate schedules of the ``scheduler`` config group, stepped once per optimizer step.

Each builder takes the optimizer and the run's planned length (``train.epochs`` times steps per
epoch; ``train.max_steps`` only cuts a run short and never changes the schedule, so a capped run
resumed later follows the uninterrupted run exactly).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["constant", "cosine"]


def _check(warmup_steps: int, total_steps: int) -> None:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps = {warmup_steps!r} is invalid: it must be an "
                         "integer >= 0 (0 = off).")
    if total_steps < 1:
        raise ValueError(f"the run has {total_steps} steps; the schedule needs at least 1.")


def constant(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """The optimizer's learning rate, after an optional linear warm-up over ``warmup_steps``."""
    _check(warmup_steps, total_steps)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0

    return LambdaLR(optimizer, factor)


def cosine(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
           min_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_ratio`` times the
    learning rate at ``total_steps``."""
    _check(warmup_steps, total_steps)
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"scheduler.min_ratio = {min_ratio} is invalid: it must be in [0, 1].")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return LambdaLR(optimizer, factor)
