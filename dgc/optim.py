"""The optimizer side of DGC, made hard to get wrong.

With ``DGCConfig.momentum > 0`` the momentum lives in the DGC state (momentum correction), so the
optimizer must apply the received average with plain SGD: a momentum optimizer would apply momentum twice.
Weight decay must not be lost either; it goes in exactly one place (SPEC 2.8):

* ``DGCConfig(weight_decay=wd)``: added to the local gradient before momentum correction, so it is
  compressed and carried by the momentum exactly as SGD's own weight decay would be (PaddlePaddle's
  placement, which recovered their 2% ResNet-50 loss).  Our default recommendation.
* ``DGCSGD(params, lr, weight_decay=wd)``: applied by the optimizer, uncompressed and without momentum
  (the official code's placement).

:func:`register` checks all of this before the first step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from .config import DGCConfig
from .ddp_hook import ddp_comm_hook
from .state import DGCState

__all__ = ["DGCSGD", "check_optimizer", "register"]

log = logging.getLogger(__name__)


class DGCSGD(torch.optim.SGD):
    """SGD without momentum, for DGC with momentum correction (the momentum is in the DGC state).

    ``weight_decay`` here is applied uncompressed by the optimizer; leave it 0 when
    ``DGCConfig.weight_decay`` is set.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay, maximize=maximize)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("momentum", 0.0):
            raise ValueError(
                "DGCSGD param_group momentum must be 0: DGC applies momentum itself "
                "(DGCConfig.momentum)."
            )
        super().add_param_group(param_group)


def check_optimizer(optimizer: torch.optim.Optimizer, config: DGCConfig) -> None:
    """Raise ``ValueError`` where ``optimizer`` and ``config`` would apply momentum or weight decay twice."""
    for i, group in enumerate(optimizer.param_groups):
        where = f"{type(optimizer).__name__}.param_groups[{i}]"
        if config.momentum > 0 and group.get("momentum", 0.0):
            raise ValueError(
                f"{where} has momentum={group['momentum']} and DGCConfig.momentum={config.momentum}: "
                "momentum would be applied twice. Use dgc.DGCSGD (or SGD with momentum=0), or "
                "DGCConfig(momentum=0) to keep the optimizer's momentum (top-k with error feedback)."
            )
        if config.momentum > 0 and "betas" in group:
            raise ValueError(
                f"{where} is an adaptive optimizer (betas={group['betas']}) and "
                f"DGCConfig.momentum={config.momentum} would add a second momentum. Use "
                "DGCConfig(momentum=0): top-k with error feedback works with any optimizer."
            )
        if config.weight_decay and group.get("weight_decay", 0.0):
            raise ValueError(
                f"{where} has weight_decay={group['weight_decay']} and DGCConfig.weight_decay="
                f"{config.weight_decay}: weight decay would be applied twice. Keep exactly one of them."
            )


def register(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    optimizer: torch.optim.Optimizer | None,
    config: DGCConfig | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
    state: DGCState | None = None,
) -> DGCState:
    """Check the optimizer, build (or re-bind) the DGC state and register the DDP hook.

    Returns the :class:`DGCState` (checkpoint it with ``state.state_dict()``).  Pass ``state`` to reuse
    one, e.g. an unpickled state, instead of building a new one from ``config``.
    """
    if not hasattr(ddp_model, "register_comm_hook") or not hasattr(ddp_model, "module"):
        raise TypeError(
            "dgc.register needs a torch.nn.parallel.DistributedDataParallel model, got "
            f"{type(ddp_model).__name__}: wrap it with DistributedDataParallel(model) first."
        )
    if state is not None and config is not None and state.config != config:
        raise ValueError("dgc.register: pass either config or a state built with it, not both")
    if state is None:
        state = DGCState(config, ddp_model.module.named_parameters(), process_group)
    else:
        state.bind(ddp_model.module.named_parameters())
        if process_group is not None:
            state.process_group = process_group
    if optimizer is not None:
        check_optimizer(optimizer, state.config)
    # What DGC sends for a parameter that then gets no gradient (DDP with find_unused_parameters or
    # static_graph) comes back to its residual before the optimizer step: DGCState does that itself, for
    # every optimizer (a global step pre-hook), so the plain register_comm_hook call is as safe.
    ddp_model.register_comm_hook(state, ddp_comm_hook)
    if state.rank == 0:
        n = sum(m.numel for m in state.memory.values())
        sparse = sum(m.numel for m in state.memory.values() if m.compressed)
        log.info(
            "DGC registered: %d tensors, %d elements (%.1f%% compressible), config %s",
            len(state.memory),
            n,
            100.0 * sparse / max(n, 1),
            state.config,
        )
    return state
