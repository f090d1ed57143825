"""``compress=dgc`` and ``compress=topk``: this package's Deep Gradient Compression in the loop.

With ``DGCConfig.momentum > 0`` (``dgc``) the momentum lives in the DGC state (momentum
correction), so the optimizer becomes :class:`dgc.DGCSGD` (SGD without momentum) with the ``optim``
config's learning rate, and weight decay moves into ``DGCConfig.weight_decay`` (applied before the
momentum correction, as PaddlePaddle found necessary; docs/algorithm.md#weight-decay).  With
momentum 0 (``topk``) the same machinery is top-k sparsification with error feedback and the
optimizer is kept as configured, momentum and weight decay included.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

import dgc
from dgc.stats import CompressionStats
from dgc.training.communication import Communication

__all__ = ["DGCCommunication"]

log = logging.getLogger(__name__)

_SGD_TARGETS = ("torch.optim.SGD", "torch.optim.sgd.SGD", "dgc.DGCSGD", "dgc.optim.DGCSGD")


class DGCCommunication(Communication):
    """Deep Gradient Compression through :func:`dgc.register` (DDP) or ``dgc.horovod``.

    Args:
        config: the validated :class:`dgc.DGCConfig`.
        warmup_epochs: length of the density warm-up in epochs (the paper's unit: 4 epochs on
            ImageNet, 1 on PTB); converted to ``config.warmup_steps`` once the number of steps per
            epoch is known, replacing it.  None = use ``config.warmup_steps`` as given.
        name: the option's name (``dgc`` or ``topk``), for logs and checkpoints.
    """

    def __init__(self, *, config: dgc.DGCConfig, warmup_epochs: float | None = None,
                 name: str = "dgc") -> None:
        if not isinstance(config, dgc.DGCConfig):
            raise TypeError(f"compress.config must build a dgc.DGCConfig, got {type(config).__name__}")
        if warmup_epochs is not None and not warmup_epochs >= 0:
            raise ValueError(f"compress.warmup_epochs = {warmup_epochs!r} is invalid: it must be "
                             ">= 0, or null to use compress.config.warmup_steps.")
        self.config = config
        self.warmup_epochs = warmup_epochs
        self.name = name
        self._state: dgc.DGCState | None = None

    def check(self, *, dist_name: str, optim: DictConfig) -> None:
        if self.config.momentum > 0 and optim.get("_target_") not in _SGD_TARGETS:
            raise ValueError(
                f"compress={self.name} applies momentum inside DGC (compress.config.momentum="
                f"{self.config.momentum}) and then needs plain SGD, but optim._target_ is "
                f"{optim.get('_target_')}. Use optim=sgd, or compress=topk (momentum 0) to keep this "
                "optimizer's own momentum."
            )
        if dist_name == "horovod":
            try:
                import dgc.horovod  # noqa: F401
            except ImportError as e:
                raise ValueError(f"compress={self.name} with dist=horovod needs dgc.horovod and "
                                 f"Horovod (bash launch/install_horovod.sh): {e}") from e

    def configure(self, *, steps_per_epoch: int, total_steps: int) -> None:
        if self.warmup_epochs is not None:
            steps = round(self.warmup_epochs * steps_per_epoch)
            self.config = dataclasses.replace(self.config, warmup_steps=steps)

    def make_optimizer(self, params: Iterable[nn.Parameter], optim: DictConfig) -> torch.optim.Optimizer:
        if self.config.momentum == 0:  # top-k with error feedback: any optimizer, as configured
            return super().make_optimizer(params, optim)
        self.check(dist_name="", optim=optim)
        weight_decay = float(optim.get("weight_decay", 0.0) or 0.0)
        if self.config.weight_decay:  # applied by DGC before the momentum correction instead
            weight_decay = 0.0
        return dgc.DGCSGD(params, lr=float(optim.lr), weight_decay=weight_decay)

    def attach_ddp(self, ddp_model: nn.parallel.DistributedDataParallel,
                   optimizer: torch.optim.Optimizer) -> None:
        self._state = dgc.register(ddp_model, optimizer, self.config)

    def wrap_horovod(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        from dgc.horovod import DistributedOptimizer

        wrapped = DistributedOptimizer(optimizer, model.named_parameters(), config=self.config,
                                       backward_passes_per_step=1)
        self._state = wrapped.dgc_state  # also inside wrapped.state_dict()["dgc"], per rank
        return wrapped

    def step_stats(self) -> CompressionStats:
        return self.dgc_state.stats

    @property
    def dgc_state(self) -> dgc.DGCState:
        if self._state is None:
            raise RuntimeError("the DGC state exists once attach_ddp()/wrap_horovod() ran")
        return self._state

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dgc": self.dgc_state.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.dgc_state.load_state_dict(state["dgc"])

    def describe(self) -> str:
        c = self.config
        kind = "DGC" if c.momentum else "top-k with error feedback"
        warm = (f", warm-up {c.warmup_steps} steps from {c.warmup_initial_density:g}"
                if c.warmup_steps else "")
        return (f"{kind}: density {c.density:g}{warm}, momentum {c.momentum:g}, "
                f"{c.dense_steps} dense steps, values {c.value_dtype}")
