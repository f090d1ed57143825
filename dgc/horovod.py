"""DGC for Horovod: a drop-in ``hvd.DistributedOptimizer`` that sends top-k pairs instead of gradients.

A thin adapter around :mod:`dgc.compressor`, like the DDP hook: the same :class:`dgc.DGCState` methods
compute the same thing, only the transport differs.  Per parameter, per step:

    Step I    (gradient hook, as soon as the parameter's gradient is accumulated, on the last of
              ``backward_passes_per_step`` passes) a tensor that goes sparse this step is compressed
              with ``state.compress`` straight into a fixed-size byte message
              ``[flags | k int32 indices | k values]`` (:mod:`dgc.wire`) and ``hvd.allgather_async``
              is launched at once, overlapping the rest of the backward pass (the official DGC code does
              the same).  A large tensor during the dense warm-up steps gets ``state.compress_dense`` and
              an immediate ``hvd.allreduce_async_`` (average).  A small tensor (bias, norm) gets
              ``state.compress_dense`` and waits for Step II;
    Step II   (``synchronize()``) the small tensors are concatenated, per dtype, into ONE allreduce
              (average); parameters whose hook never fired on this rank are launched with a zero
              gradient, as Horovod does, so every rank submits the same collectives;
    Step III  (``synchronize()``) wait for everything; ``state.decompress`` scatter-adds the N workers'
              pairs into ``p.grad`` (the average); dense payloads clear their residual
              (``state.finish_dense``); ``state.end_step()`` advances the density schedule;
    Step IV   ``step()`` applies ``p.grad`` with the wrapped optimizer, which must not apply momentum
              again (checked with :func:`dgc.check_optimizer`).

Horovod's semantics are kept: ``synchronize()`` / ``skip_synchronize()`` (for gradient clipping or
``torch.amp.GradScaler``; a second ``synchronize()`` with no backward pass in between, as a plain
``step()`` after ``synchronize()`` makes, sends nothing), ``backward_passes_per_step`` (local
accumulation), and the error when
``zero_grad()`` is called between ``backward()`` and ``step()``.  ``state_dict()`` carries the DGC state
(momentum, residual, step) under the key ``"dgc"``; each rank saves its own, since residuals differ.

Horovod is imported when this module is imported, never by ``import dgc``.  Install it with
``bash launch/install_horovod.sh`` (Horovod 0.28.1 patched for PyTorch 2.x).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .config import DGCConfig
from .optim import check_optimizer

try:
    import horovod.torch  # noqa: F401 - fail here, with the way to install it
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "dgc.horovod needs Horovod with PyTorch support, which failed to import "
        f"({type(exc).__name__}: {exc}). Install it into this environment with "
        "`bash launch/install_horovod.sh` (it builds Horovod 0.28.1 patched for PyTorch 2.x; "
        "see docs/horovod.md)."
    ) from exc

from .horovod_optimizer import (  # noqa: E402 - after the friendly ImportError above
    HorovodDGCState,
    _check_passes,
    _DGCDistributedOptimizer,
)

__all__ = ["DistributedOptimizer", "HorovodDGCState"]

log = logging.getLogger(__name__)


def DistributedOptimizer(  # noqa: N802 - named like hvd.DistributedOptimizer on purpose
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, Tensor]] | None = None,
    config: DGCConfig | None = None,
    backward_passes_per_step: int = 1,
    process_set: Any = None,
    node_groups: Sequence[Sequence[int]] | None = None,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` applies the DGC average of all workers' gradients.

    Use it where you would use ``hvd.DistributedOptimizer``::

        hvd.init()
        optimizer = dgc.DGCSGD(model.parameters(), lr=0.1)        # no momentum: DGC applies it
        optimizer = dgc.horovod.DistributedOptimizer(
            optimizer, model.named_parameters(), config=dgc.DGCConfig(density=0.001))
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    Args:
        optimizer: the local optimizer (its class is extended, as Horovod does; do not use the
            original object afterwards).  With ``config.momentum > 0`` it must not apply momentum
            (:func:`dgc.check_optimizer` raises otherwise): use :class:`dgc.DGCSGD`.
        named_parameters: ``model.named_parameters()``; names key the DGC state and the Horovod
            collectives, so they must be the same on every rank.  None: generated from the
            optimizer's parameter order.
        config: :class:`dgc.DGCConfig` (None: the defaults).
        backward_passes_per_step: backward passes accumulated locally before communicating (>= 1).
        process_set: a Horovod process set to reduce over (None: all processes).
        node_groups: with ``DGCConfig(hierarchy="node")``, the ranks (in ``process_set``) of each node,
            e.g. ``[[0, 1], [2, 3]]``; None: from ``hvd.cross_rank()``/``hvd.local_rank()`` (every
            host must run the same number of processes).  Intra-node collectives need one Horovod
            process set per node: ``hvd.init(process_sets="dynamic")`` (dgc adds them) or the sets
            passed to ``hvd.init(process_sets=[...])``; see docs/horovod.md.

    The result is an instance of the optimizer's own class (so LR schedulers and ``isinstance``
    work) with Horovod's ``synchronize()``, ``skip_synchronize()``, ``set_backward_passes_per_step``
    and a ``dgc_state`` property.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"dgc.horovod.DistributedOptimizer wraps a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}."
        )
    if hasattr(optimizer, "_dgc"):
        raise TypeError("this optimizer is already a dgc.horovod.DistributedOptimizer")
    if config is None:
        config = DGCConfig()
    if not isinstance(config, DGCConfig):
        raise TypeError(f"config must be a dgc.DGCConfig, got {type(config).__name__}")
    _check_passes(backward_passes_per_step)
    check_optimizer(optimizer, config)
    named = _named_parameters(optimizer, named_parameters)

    # Like hvd.DistributedOptimizer: a new class deriving from the optimizer's own, so step() runs
    # the wrapped optimizer's update after synchronizing.  The instance takes over the optimizer's
    # attributes (param_groups, state, defaults, hooks) instead of re-running its __init__.
    cls = type(
        optimizer.__class__.__name__,
        (optimizer.__class__,),
        dict(_DGCDistributedOptimizer.__dict__),
    )
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)
    wrapped._dgc_setup(named, config, backward_passes_per_step, process_set, node_groups)
    state = wrapped.dgc_state
    if state.rank == 0:
        total = sum(m.numel for m in state.memory.values())
        sparse = sum(m.numel for m in state.memory.values() if m.compressed)
        log.info(
            "DGC (Horovod, %d workers): %d tensors, %d elements (%.1f%% compressible), config %s",
            state.world_size,
            len(state.memory),
            total,
            100.0 * sparse / max(total, 1),
            config,
        )
    return wrapped


def _named_parameters(
    optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, Tensor]] | None
) -> list[tuple[str, Tensor]]:
    if named_parameters is None:
        return [
            (f"param.{i}.{j}", p)
            for i, group in enumerate(optimizer.param_groups)
            for j, p in enumerate(group["params"])
        ]
    named = list(named_parameters)
    if any(not (isinstance(t, tuple) and len(t) == 2) for t in named):
        raise TypeError(
            "named_parameters must be (name, parameter) pairs, as model.named_parameters() gives."
        )
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    named_ids = {id(p) for _, p in named}
    if in_optimizer - named_ids:
        raise ValueError(
            f"{len(in_optimizer - named_ids)} parameter(s) of the optimizer are not in "
            "named_parameters: pass model.named_parameters() of the model the optimizer trains."
        )
    # Parameters the optimizer does not train (frozen or elsewhere) need no DGC state.
    return [(n, p) for n, p in named if id(p) in in_optimizer]

