"""The optimizer side of DGC, made hard to get wrong.

With ``DGCConfig.momentum > 0`` the momentum lives in the DGC state (momentum correction), so the
optimizer must apply the received average with plain SGD: a momentum optimizer would apply momentum twice.
Weight decay must not be lost either; it goes in exactly one of three places
(docs/algorithm.md#weight-decay, docs/reliability.md):

* ``DGCConfig(weight_decay=wd)``: added to the local gradient before momentum correction, so it is
  compressed and carried by the momentum exactly as SGD's own weight decay would be (PaddlePaddle's
  placement, which recovered their 2% ResNet-50 loss).  Our default recommendation.
* ``DGCSGD(params, lr, weight_decay=wd)``: applied by the optimizer, uncompressed and *without*
  momentum: each step subtracts ``lr * wd * p`` and nothing more.
* ``DGCSGD(params, lr, weight_decay=wd, decay_momentum=m)``: the official code's placement
  (Lin et al.'s ``dgc/optim/sgd.py``): applied by the optimizer, uncompressed, *with its own momentum
  buffer* ``b = m * b + wd * p``; the step is ``lr * (b + grad)``.  In steady state its decay term is
  up to ``1 / (1 - m)`` times the previous placement's (10x at m = 0.9).

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
from .ddp_session import DDPSession
from .state import DGCState

__all__ = ["DGCSGD", "check_optimizer", "register"]

log = logging.getLogger(__name__)


class DGCSGD(torch.optim.SGD):
    """SGD without momentum, for DGC with momentum correction (the momentum is in the DGC state).

    Weight decay, when not already in ``DGCConfig.weight_decay`` (keep exactly one of them), is
    applied here, uncompressed, in one of two ways:

    * ``decay_momentum=0`` (default): ``p -= lr * (grad + wd * p)``, plain SGD's L2 term, with no
      momentum on it.
    * ``decay_momentum=m > 0``: the placement of the official DGC code (Lin et al., ``dgc/optim/sgd.py``;
      docs/algorithm.md#weight-decay): the decay term has its own momentum buffer,
      ``b = wd * p`` at the first step, then ``b = m * b + wd * p``, and
      ``p -= lr * (b + grad)`` (``decay_nesterov=True``: ``p -= lr * (wd * p + m * b + grad)``).
      Use ``m = DGCConfig.momentum`` to reproduce the official runs; the buffer is in
      ``optimizer.state[p]["decay_buffer"]`` and checkpointed with the optimizer.  The gradient
      itself still gets no momentum here (DGC applied it).

    Both keys can differ per param group (e.g. ``{"params": biases, "weight_decay": 0}``).
    ``maximize=True`` negates the gradient only, as ``torch.optim.SGD`` does.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        decay_momentum: float = 0.0,
        decay_nesterov: bool = False,
        maximize: bool = False,
    ) -> None:
        self._decay_defaults = {"decay_momentum": decay_momentum, "decay_nesterov": decay_nesterov}
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay, maximize=maximize)
        self.defaults.update(self._decay_defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("momentum", 0.0):
            raise ValueError(
                "DGCSGD param_group momentum must be 0: DGC applies momentum itself "
                "(DGCConfig.momentum). For momentum on the weight-decay term (the official DGC "
                "code's placement) pass decay_momentum=m."
            )
        for key, value in getattr(self, "_decay_defaults", {}).items():
            param_group.setdefault(key, value)
        m, nesterov = param_group.get("decay_momentum", 0.0), param_group.get("decay_nesterov", False)
        if isinstance(m, bool) or not isinstance(m, int | float) or not 0.0 <= m < 1.0:
            raise ValueError(f"DGCSGD decay_momentum = {m!r} is invalid: it must be a number in [0, 1) "
                             "(0 = weight decay without momentum).")
        if not isinstance(nesterov, bool) or (nesterov and m == 0):
            raise ValueError(f"DGCSGD decay_nesterov = {nesterov!r} is invalid: it must be a bool, and "
                             "True needs decay_momentum > 0.")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update; with ``decay_momentum`` the official placement (see the class docstring)."""
        if not any(g.get("decay_momentum", 0.0) and g["weight_decay"] for g in self.param_groups):
            sgd_step = torch.optim.SGD.step  # torch's own implementation...
            if getattr(sgd_step, "hooked", False):  # ...without the step hooks, which already ran
                sgd_step = sgd_step.__wrapped__  # for this call (this method is wrapped too)
            return sgd_step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """``p -= lr * d`` with the official code's ``d`` (the same operations, in the same order)."""
        wd, m = group["weight_decay"], group.get("decay_momentum", 0.0)
        grad = -p.grad if group["maximize"] else p.grad
        if wd == 0:
            d_p = grad
        elif m == 0:
            d_p = grad.add(p, alpha=wd)
        else:
            d_p = wd * p
            state = self.state[p]
            if "decay_buffer" not in state:
                buf = state["decay_buffer"] = d_p.clone()
            else:
                buf = state["decay_buffer"]
                buf.mul_(m).add_(d_p)
            d_p = d_p.add(buf, alpha=m) if group.get("decay_nesterov", False) else buf
            d_p = d_p.add(grad)
        p.add_(d_p, alpha=-float(group["lr"]))


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
    node_groups: list[list[int]] | None = None,
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
        state = DGCState(config, ddp_model.module.named_parameters(), process_group, node_groups=node_groups)
    else:
        state.bind(ddp_model.module.named_parameters())
        if process_group is not None:
            state.process_group = process_group
    if optimizer is not None:
        check_optimizer(optimizer, state.config)
    # What DGC sends for a parameter that then gets no gradient (DDP with find_unused_parameters or
    # static_graph) comes back to its residual before this optimizer's step (see dgc.ddp_session).
    # A parameter can only miss its gradient when DDP allows unused parameters: otherwise skip the
    # copy of every dense bucket that the give-back needs.
    state.track_sent = bool(getattr(ddp_model, "find_unused_parameters", True)
                            or getattr(ddp_model, "static_graph", True))
    session = DDPSession.of(state)
    if optimizer is not None:
        session.attach_optimizer(optimizer)
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
