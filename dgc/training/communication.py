"""How gradients cross the network: the interface every ``compress`` option implements.

Without ``+compress=...`` training uses :class:`Allreduce`, DDP's own bucketed allreduce (no hook).
The options of the ``compress`` config group (conf/compress/) are subclasses:
:class:`~dgc.training.dgc_communication.DGCCommunication` (``dgc``, ``topk``),
:class:`~dgc.training.quant_communication.QuantCommunication` (``int8``, ``terngrad``, ``qsgd``:
quantized gradients in a two-phase exchange, DDP or Horovod) and
:class:`~dgc.training.torch_hooks.FP16Compression`, :class:`~dgc.training.torch_hooks.PowerSGD`
(PyTorch's own hooks, for comparison).  Each one

1. shapes the optimizer (:meth:`make_optimizer`: DGC moves momentum out of it),
2. plugs itself into DDP (:meth:`attach_ddp`) or Horovod (:meth:`wrap_horovod`),
3. reports what one worker sent in the last step (:meth:`step_stats`, a
   :class:`dgc.CompressionStats`), and
4. checkpoints its per-rank state (:meth:`state_dict`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from dgc.stats import CompressionStats

__all__ = ["Allreduce", "Communication", "dense_stats"]

log = logging.getLogger(__name__)


def dense_stats(model: nn.Module, bytes_per_element: int | None = None) -> CompressionStats:
    """Traffic of one step that sends every gradient element (``bytes_per_element`` each; None =
    the parameter's own element size)."""
    stats = CompressionStats()
    for p in model.parameters():
        if not p.requires_grad:
            continue
        dense = p.numel() * p.element_size()
        sent = dense if bytes_per_element is None else p.numel() * bytes_per_element
        stats.add(sent=sent, received=sent, dense=dense, elements=p.numel(),
                  elements_sent=p.numel())
    stats.dense_buckets = 1
    return stats


class Communication:
    """Plain averaging of the gradients; the base class of every ``compress`` option.

    Byte counts follow :class:`dgc.CompressionStats`: payload handed to the collective by one worker
    per step (``bytes_sent``), and the dense-equivalent gradient bytes (``dense_bytes``).
    """

    name = "none"
    """The ``compress`` option's name (``none`` = no ``+compress``), for logs and checkpoints."""

    # ------------------------------------------------------------------ set-up
    def check(self, *, dist_name: str, optim: DictConfig) -> None:
        """Raise ``ValueError`` if this option cannot run on the ``dist`` runtime or with the
        ``optim`` config (called before any process group starts)."""

    def configure(self, *, steps_per_epoch: int, total_steps: int) -> None:
        """Resolve settings given in epochs now that the data size is known."""

    def make_optimizer(self, params: Iterable[nn.Parameter], optim: DictConfig) -> torch.optim.Optimizer:
        """The optimizer of ``optim`` (a ``_partial_`` config of the ``optim`` group)."""
        return instantiate(optim)(params)

    def ddp_kwargs(self) -> dict[str, Any]:
        """Overrides of ``DistributedDataParallel``'s arguments this option needs."""
        return {}

    def attach_ddp(self, ddp_model: nn.parallel.DistributedDataParallel,
                   optimizer: torch.optim.Optimizer) -> None:
        """Register this option's comm hook (none: DDP's built-in allreduce)."""
        self._stats = dense_stats(ddp_model.module)

    def wrap_horovod(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """Horovod's counterpart of :meth:`attach_ddp`: wrap the optimizer."""
        import horovod.torch as hvd

        self._stats = dense_stats(model)
        return hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

    # ------------------------------------------------------------------ per step
    def step_stats(self) -> CompressionStats:
        """What this worker sent in the step that just finished."""
        return self._stats

    @property
    def dgc_state(self) -> Any:
        """The ``dgc.DGCState`` (for pruning masks and the sparsity report), or None."""
        return None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """This rank's communication state (``torch.load(weights_only=True)``-safe)."""
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("name")
        if saved != self.name:
            raise ValueError(
                f"the checkpoint was written with compress={saved or 'none'} and this run uses "
                f"compress={self.name}: their per-rank states differ. Resume with the same compress "
                "option (or start a new run from the model weights)."
            )

    def describe(self) -> str:
        return "allreduce (no compression)"


class Allreduce(Communication):
    """No ``+compress``: DDP's own bucketed allreduce of fp32 gradients (the dense baseline)."""
