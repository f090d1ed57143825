"""The quantized compressors (int8, TernGrad, QSGD) for Horovod: a drop-in
``hvd.DistributedOptimizer`` that averages gradients with the two-phase quantized exchange.

The same exchange as the DDP hook (:mod:`dgc.quant.transport`: the same messages, residuals and
statistics, bit for bit on the same buckets), carried by ``hvd.alltoall_async`` (phase 1, launched
from each large parameter's gradient hook) and ``hvd.allgather_async`` (phase 2, launched in
``synchronize()``); the steps are in :mod:`dgc.quant.horovod_optimizer`.  Horovod's semantics are
kept: ``synchronize()``/``skip_synchronize()``, ``backward_passes_per_step``, the ``zero_grad()``
check; ``state_dict()`` carries this rank's residuals under ``"quant"``.

Horovod is imported when this module is imported, never by ``import dgc`` or ``import dgc.quant``.
Install it with ``bash launch/install_horovod.sh`` (Horovod 0.28.1 patched for PyTorch 2.x).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .config import QuantConfig

try:
    import horovod.torch  # noqa: F401 - fail here, with the way to install it
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "dgc.quant.horovod needs Horovod with PyTorch support, which failed to import "
        f"({type(exc).__name__}: {exc}). Install it into this environment with "
        "`bash launch/install_horovod.sh` (it builds Horovod 0.28.1 patched for PyTorch 2.x; "
        "see docs/horovod.md)."
    ) from exc

from dgc.horovod import _named_parameters  # noqa: E402 - after the friendly ImportError above
from dgc.horovod_optimizer import _check_passes  # noqa: E402

from .horovod_optimizer import HorovodQuantState, namespace  # noqa: E402

__all__ = ["DistributedOptimizer", "HorovodQuantState"]

log = logging.getLogger(__name__)


def DistributedOptimizer(  # noqa: N802 - named like hvd.DistributedOptimizer on purpose
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, Tensor]] | None = None,
    config: QuantConfig | None = None,
    backward_passes_per_step: int = 1,
    process_set: Any = None,
    *,
    group_below_numel: int = 1024,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` applies the quantized average of all workers' gradients.

    Use it where you would use ``hvd.DistributedOptimizer``; the optimizer is kept as it is
    (momentum and weight decay included)::

        hvd.init()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        optimizer = dgc.quant.horovod.DistributedOptimizer(
            optimizer, model.named_parameters(), config=dgc.quant.QuantConfig(method="int8"))
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    Args:
        optimizer: the local optimizer (its class is extended, as Horovod does; do not use the
            original object afterwards).
        named_parameters: ``model.named_parameters()``; names key the residuals and the Horovod
            collectives, so they must be the same on every rank.  None: generated from the
            optimizer's parameter order.
        config: :class:`dgc.quant.QuantConfig` (None: int8 with error feedback).
        backward_passes_per_step: backward passes accumulated locally before communicating (>= 1).
        process_set: a Horovod process set to average over (None: all processes).
        group_below_numel: parameters with fewer elements are not exchanged alone but together,
            one bucket per dtype, in ``synchronize()`` (a bucket costs a 4-byte header and at
            least one scale per message, and two collectives); larger ones go alone, launched
            from their gradient hook.  1 = every parameter alone.

    The result is an instance of the optimizer's own class with Horovod's ``synchronize()``,
    ``skip_synchronize()``, ``set_backward_passes_per_step`` and a ``quant_state`` property
    (:class:`HorovodQuantState`: ``stats``, ``network_bytes``, ``residuals``, ``step``).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"dgc.quant.horovod.DistributedOptimizer wraps a torch.optim.Optimizer, "
                        f"got {type(optimizer).__name__}.")
    if hasattr(optimizer, "_quant") or hasattr(optimizer, "_dgc"):
        raise TypeError("this optimizer is already a Horovod DistributedOptimizer of dgc: wrap "
                        "the plain optimizer once.")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a dgc.quant.QuantConfig, got {type(config).__name__} "
                        "(dgc.DGCConfig goes to dgc.horovod.DistributedOptimizer).")
    _check_passes(backward_passes_per_step)
    if isinstance(group_below_numel, bool) or not isinstance(group_below_numel, int) \
            or group_below_numel < 1:
        raise ValueError(f"group_below_numel = {group_below_numel!r} is invalid: it must be an "
                         "integer >= 1 (1 = every parameter exchanged alone).")
    named = _named_parameters(optimizer, named_parameters)
    # Like hvd.DistributedOptimizer: a new class deriving from the optimizer's own; the instance
    # takes over the optimizer's attributes instead of re-running its __init__.
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), namespace())
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)
    wrapped._quant_setup(named, config, backward_passes_per_step, process_set, group_below_numel)
    state = wrapped.quant_state
    if state.rank == 0:
        alone = sum(p.numel() >= group_below_numel for _, p in named)
        log.info("quant (Horovod, %d workers): %d tensors (%d exchanged alone, the rest grouped "
                 "per dtype), %s", state.world_size, len(named), alone, config)
    return wrapped
