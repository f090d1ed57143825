"""The quantized compressors' Horovod optimizer: the two-phase exchange of
:mod:`dgc.quant.transport` over ``hvd.alltoall`` and ``hvd.allgather``, mixed into the user's
optimizer class.

:func:`dgc.quant.horovod.DistributedOptimizer` builds it; this module holds what it does per step:

    Step I    (gradient hook, on the last of ``backward_passes_per_step`` passes) a parameter of at
              least ``group_below_numel`` elements is a bucket of its own: its corrected gradient is
              quantized for the other workers (phase 1) and its ``hvd.alltoall_async`` launched at
              once, overlapping the rest of the backward pass.  A smaller one waits;
    Step II   (``synchronize()``) parameters whose hook never fired here send their ``p.grad``
              (zeros where None), so every rank submits the same collectives; the small parameters
              are concatenated, per dtype, in the reverse of the optimizer's order (the order
              backward produces them, as DDP buckets them), into one bucket each;
    Step III  (``synchronize()``) bucket by bucket, in an order that is the same on every rank:
              wait for the all-to-all, average and requantize the own shard, launch
              ``hvd.allgather_async``; then wait for the all-gathers and decode the averages into
              ``p.grad``.  After phase 1 every rank knows every rank's non-finite flag, so all of
              them skip the same all-gathers and fail the same step.

Horovod's step protocol (the gradient hook's counting of ``backward_passes_per_step``, ``step()``,
``skip_synchronize()``, the ``zero_grad()`` check) is :mod:`dgc.horovod_optimizer`'s, reused as is.
Imports Horovod: import it through :mod:`dgc.quant.horovod`, which says how to install it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import horovod.torch as hvd
import torch
from torch import Tensor

from dgc.horovod_optimizer import _DGCDistributedOptimizer

from . import transport
from .config import QuantConfig
from .exchange import Shards
from .state import QuantState
from .transport import Bucket

__all__ = ["HorovodQuantState", "namespace"]

log = logging.getLogger(__name__)

_GROUPED = "grouped"
"""Marks a small parameter whose gradient waits for synchronize()'s bucket of its dtype."""

_REUSED = ("_on_grad", "set_backward_passes_per_step", "skip_synchronize", "step", "zero_grad")
"""Methods of dgc.horovod's optimizer that hold Horovod's step protocol and nothing of DGC's."""


class HorovodQuantState(QuantState):
    """:class:`dgc.quant.QuantState` whose rank and world size are Horovod's (a process set's).

    Only the topology differs: residuals, step, statistics and checkpoints are the DDP hook's.
    """

    def __init__(self, config: QuantConfig, named_parameters: Iterable[tuple[str, Tensor]],
                 process_set: Any = None) -> None:
        if not hvd.is_initialized():
            raise RuntimeError("dgc.quant.horovod: Horovod is not initialized; call hvd.init() "
                               "before building the optimizer (it needs the rank and world size).")
        super().__init__(config, named_parameters, None)
        self.process_set = hvd.global_process_set if process_set is None else process_set
        self.world_size = self.process_set.size()
        self.rank = self.process_set.rank() if self.process_set.included() else 0


@dataclass(kw_only=True, slots=True)
class _Flight:
    """A bucket on its way: its parameters, its trip through the exchange, its phase-1 messages and
    the handle of their all-to-all (None for both with one worker: nothing is sent)."""

    params: list[Tensor]
    trip: Bucket
    name: str
    shards: Shards | None = None
    handle: int | None = None

    def scatter_back(self) -> None:
        """Copy the bucket's average into the parameters' gradients (a no-op for a parameter whose
        gradient is the buffer itself)."""
        trip = self.trip
        for p, off, numel in zip(self.params, trip.layout.offsets, trip.layout.numels, strict=True):
            average = trip.buffer[off : off + numel].view_as(p.grad)
            if average.data_ptr() != p.grad.data_ptr():
                p.grad.copy_(average)


class _QuantDistributedOptimizer(torch.optim.Optimizer):
    """Methods mixed into the user's optimizer class by
    :func:`dgc.quant.horovod.DistributedOptimizer` (not used alone; see :func:`namespace`)."""

    # ------------------------------------------------------------------ construction
    def _quant_setup(self, named_parameters: list[tuple[str, Tensor]], config: QuantConfig,
                     backward_passes_per_step: int, process_set: Any,
                     group_below_numel: int) -> None:
        self._quant = HorovodQuantState(config, named_parameters, process_set)
        self._process_set = self._quant.process_set
        self._names: dict[Tensor, str] = {p: n for n, p in named_parameters}
        self._group_below = group_below_numel
        self.backward_passes_per_step = backward_passes_per_step
        self._delay: dict[Tensor, int] = {}
        # p -> None (hook fired on an accumulation pass), _GROUPED, or its bucket in flight.
        self._handles: dict[Tensor, _Flight | str | None] = {}
        self._synchronized = False
        self._new_grads = False  # a gradient hook fired since the last synchronize()
        self._should_synchronize = True
        self._requires_update: list[Tensor] = [
            p for group in self.param_groups for p in group["params"] if p.requires_grad]
        self._index = {p: i for i, p in enumerate(self._requires_update)}
        self._hook_handles = []
        for p in self._requires_update:
            self._delay[p] = backward_passes_per_step
            self._hook_handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    @property
    def quant_state(self) -> HorovodQuantState:
        """The quantized exchange's state (residuals, ``step``, ``stats``, ``network_bytes``)."""
        return self._quant

    # ------------------------------------------------------------------ Step I
    def _launch(self, p: Tensor) -> _Flight | str:
        """Called by the gradient hook (and by synchronize()): a large parameter goes now, a small
        one waits for its dtype's bucket."""
        if p.grad.is_sparse:
            raise TypeError(f"dgc.quant.horovod: parameter {self._names[p]!r} has a sparse gradient "
                            "(nn.Embedding(sparse=True)); the quantizers need dense gradients: use "
                            "sparse=False.")
        if p.numel() < self._group_below or not self._process_set.included():
            return _GROUPED  # (a rank outside the process set sends nothing)
        if not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        return self._send([p], p.grad.view(-1), self._index[p], f"quant.{self._names[p]}")

    def _send(self, params: list[Tensor], buffer: Tensor, index: int, name: str) -> _Flight:
        """Phase 1 of one bucket: quantize the other workers' shards, launch the all-to-all."""
        state = self._quant
        trip = transport.prepare(state, index, state.layout(params), buffer)
        flight = _Flight(params=params, trip=trip, name=name)
        if state.world_size > 1:
            flight.shards = transport.encode(state, trip)
            flight.handle = hvd.alltoall_async(flight.shards.messages, name=f"{name}.alltoall",
                                               process_set=self._process_set)
        return flight

    # ------------------------------------------------------------------ Steps II-III
    def synchronize(self) -> None:
        """Finish this step's exchange: afterwards ``p.grad`` holds the quantized average.

        As in :meth:`dgc.horovod_optimizer`'s: a second call with no backward pass in between does
        nothing; a call right after ``step()`` with no backward pass is a real step (``p.grad`` is
        sent again, with the residuals); after a ``NonFiniteGradientError`` the step counts as not
        synchronized.
        """
        if self._synchronized and not self._new_grads:
            return
        self._new_grads = False
        included = self._process_set.included()
        for p in self._requires_update if included else ():  # every rank: the same collectives
            if self._handles.get(p) is None:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._handles[p] = self._launch(p)
        flights = [f for f in self._handles.values() if isinstance(f, _Flight)]
        # Largest index first: the order backward launched them in (the same on every rank).
        flights = sorted(flights, key=lambda f: -f.trip.index)
        flights += self._launch_groups() if included else []
        self._handles.clear()
        for p in self._delay:
            self._delay[p] = self.backward_passes_per_step
        if not included:  # outside the process set: p.grad stays local
            self._synchronized = True
            return
        self._settle(flights)

    def _launch_groups(self) -> list[_Flight]:
        """Step II: one bucket per dtype for the small parameters."""
        groups: dict[torch.dtype, list[Tensor]] = {}
        for p in reversed(self._requires_update):
            if self._handles.get(p) == _GROUPED:
                groups.setdefault(p.grad.dtype, []).append(p)
        first = len(self._requires_update)
        return [self._send(params, torch.cat([p.grad.reshape(-1) for p in params]), first + i,
                           f"quant.group.{dtype}")
                for i, (dtype, params) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0])))]

    def _settle(self, flights: list[_Flight]) -> None:
        """Step III, then the step's end: decode every bucket, or fail the step on every rank."""
        state, gathers = self._quant, []
        for f in flights:
            if f.handle is None:
                transport.single(state, f.trip)
                continue
            received, _ = hvd.synchronize(f.handle)
            reduced = transport.reduce(state, f.trip, f.shards, received)
            if reduced is not None:
                gathers.append((f, hvd.allgather_async(reduced.message, name=f"{f.name}.allgather",
                                                       process_set=self._process_set)))
        for f, handle in gathers:
            transport.decode(state, f.trip, hvd.synchronize(handle))
        failed = state.failed
        propagate = state.config.nonfinite == "propagate"
        for f in flights:
            if failed is not None:
                f.trip.buffer.fill_(float("nan") if propagate else 0.0)
            f.scatter_back()
        state.end_step(failed=failed is not None)
        # After a raised failure p.grad holds zeros, not an average: leave the step unsynchronized,
        # so that a retried step() sends again instead of applying them.
        self._synchronized = failed is None or propagate
        if failed is not None and not propagate:
            raise transport.nonfinite_error(state, failed, flights[-1].trip.layout.names)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus ``"quant"``: this rank's residuals and step."""
        sd = super(self.__class__, self).state_dict()
        sd["quant"] = self._quant.state_dict()
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a dict without ``"quant"`` (a plain optimizer's) keeps the
        current residuals."""
        sd = dict(state_dict)
        if "dgc" in sd:
            raise ValueError("this optimizer state was saved by dgc.horovod (DGC), not by "
                             "dgc.quant.horovod: resume with the same compressor.")
        quant = sd.pop("quant", None)
        # dgc.horovod's: resets the step protocol, then loads the wrapped optimizer's state.
        _DGCDistributedOptimizer.load_state_dict(self, sd)
        if quant is not None:
            self._quant.load_state_dict(quant)


def namespace() -> dict[str, Any]:
    """The methods of the class :func:`dgc.quant.horovod.DistributedOptimizer` derives from the
    user's optimizer class: Horovod's step protocol from :mod:`dgc.horovod_optimizer`, the
    exchange from this module."""
    reused = {name: vars(_DGCDistributedOptimizer)[name] for name in _REUSED}
    own = {k: v for k, v in vars(_QuantDistributedOptimizer).items()
           if k not in ("__dict__", "__weakref__")}
    return {**reused, **own}
