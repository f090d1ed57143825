"""Hydra entry point of the ``prune`` config group (conf/prune/*.yaml).

Each YAML file has ``_target_: dgc.pruning.build_pruner`` and ``_partial_: true``, with the
granularity and the schedule as nested ``_target_`` nodes, so the training loop does::

    pruner = hydra.utils.instantiate(cfg.prune)(model=model, optimizer=optimizer,
                                                total_steps=total_steps, dgc_state=dgc_state)
    for step in range(start_step, total_steps):
        pruner.step(step)          # before the forward pass; step = optimizer steps done
        ...forward, backward, optimizer.step()...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dgc.pruning.granularity import Granularity
from dgc.pruning.pruner import DEFAULT_PRUNABLE, Pruner
from dgc.pruning.schedule import Schedule

__all__ = ["build_pruner"]


def build_pruner(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    granularity: Granularity,
    schedule: Schedule,
    total_steps: int | None = None,
    dgc_state: Any = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    min_numel: int = 0,
    l1: float = 0.0,
    sync_masks: bool = True,
    process_group: Any = None,
) -> Pruner:
    """Build a ``Pruner`` for ``model`` (a DDP wrapper is fine).

    ``total_steps`` (the number of optimizer steps of the run) resolves schedule positions
    given as fractions of training. See ``Pruner`` for the other arguments.
    """
    if total_steps is not None and (isinstance(total_steps, bool) or
                                    not isinstance(total_steps, int) or total_steps < 1):
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    return Pruner(
        model,
        granularity=granularity,
        schedule=schedule.resolve(total_steps),
        include=None if include is None else list(include),
        exclude=list(exclude),
        module_types=DEFAULT_PRUNABLE,
        min_numel=min_numel,
        l1=l1,
        sync_masks=sync_masks,
        process_group=process_group,
        optimizer=optimizer,
        dgc_state=dgc_state,
    )
