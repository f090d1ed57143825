"""``train(cfg)``: the entry point of ``launch/train.py``, in three steps.

1. Build and validate every part of the config (model, data, optimizer, compression, precision,
   pruning, logger) *before* any process group starts, so a bad option fails fast and alone
   (:meth:`~dgc.training.trainer.Parts.build`).
2. Join the other processes (``dist``: :class:`~dgc.training.runtime.Runtime`).
3. Train (:class:`~dgc.training.trainer.Trainer`): epoch by epoch; every ``logger.log_every``
   steps a ``step`` record, after every epoch an evaluation and an ``epoch`` record, at the end a
   ``summary`` record (returned).
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from dgc.training.trainer import Parts, Trainer, evaluate

__all__ = ["evaluate", "train"]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the ``summary`` record (on every rank)."""
    parts = Parts.build(cfg)  # 1. everything that needs no other process, validated now
    ctx = parts.runtime.init()  # 2. SYNC: join the other processes
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        summary = Trainer(parts, ctx).run()  # 3.
        # No rank tears the group down while another still finishes its last collective (gloo then
        # aborts that rank at exit: "terminate called without an active exception").  Only on
        # success: after a failure on one rank a barrier would wait for it forever.
        parts.runtime.barrier()  # SYNC
        return summary
    finally:
        parts.metrics.close()
        parts.runtime.shutdown()
