"""The Horovod transport's optimizer: DGC's step protocol mixed into the user's optimizer class.

:func:`dgc.horovod.DistributedOptimizer` builds it; this module holds what it does per step (see the
Steps in :mod:`dgc.horovod`): gradient hooks that encode groups with the shared :class:`~dgc.codec.Codec`
and launch Horovod's collectives, ``synchronize()`` that decodes them and settles the step through the
:class:`~dgc.ledger.StepLedger`, and Horovod's ``step``/``skip_synchronize``/``zero_grad`` semantics.
With ``DGCConfig(hierarchy="node")`` the groups are node buckets (:mod:`dgc.hierarchy_horovod_steps`).
Imports Horovod: import it through :mod:`dgc.horovod`, which says how to install Horovod when missing.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import horovod.torch as hvd
import torch
from torch import Tensor

from .config import DGCConfig
from .errors import NonFiniteGradientError
from .hierarchy_horovod import HorovodNodeTopology, node_groups_of
from .hierarchy_horovod_steps import NodeBuckets
from .horovod_flight import Flight as _Flight
from .ledger import StepLedger
from .state import DGCState

__all__ = ["HorovodDGCState"]


class HorovodDGCState(DGCState):
    """:class:`dgc.DGCState` whose world size and rank are Horovod's (a process set's).

    Only the topology differs; everything DGC keeps (momentum, residual, step, masks, stats) and every
    per-tensor method are the core's.  ``process_set`` None means Horovod's global process set.
    ``node_groups`` (``DGCConfig(hierarchy="node")``): the ranks (in the process set) of each node; None:
    found from ``hvd.cross_rank()``/``hvd.local_rank()`` (a collective: every rank builds its state).
    """

    def __init__(
        self,
        config: DGCConfig | None = None,
        named_parameters: Iterable[tuple[str, Tensor]] = (),
        process_set: Any = None,
        *,
        node_groups: Any = None,
    ) -> None:
        if not hvd.is_initialized():
            raise RuntimeError(
                "dgc.horovod: Horovod is not initialized; call hvd.init() before building the "
                "DGC optimizer (the DGC state needs the rank and world size)."
            )
        self.process_set = process_set  # set first: DGCState.__init__ reads self.rank
        if config is not None and config.hierarchy == "node":
            node_groups = node_groups_of(self._set, node_groups)
        elif node_groups is not None:
            raise ValueError(
                "node_groups is only used with DGCConfig(hierarchy='node'); this config has "
                f"hierarchy={'flat' if config is None else config.hierarchy!r}: drop node_groups or set "
                "hierarchy='node'."
            )
        super().__init__(config, named_parameters, None, node_groups=node_groups)

    @property
    def _set(self) -> Any:
        return hvd.global_process_set if self.process_set is None else self.process_set

    @property
    def world_size(self) -> int:
        return self._set.size()

    @property
    def rank(self) -> int:
        return self._set.rank()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["process_set"] = None  # reattached by whoever unpickles it
        return state


_GROUPED = "grouped"
"""Marks a small dense tensor whose gradient waits for synchronize()'s grouped allreduce."""
_NODE = "node"
"""Marks a tensor that went into its node bucket (``hierarchy="node"``)."""


class _DGCDistributedOptimizer(torch.optim.Optimizer):
    """Methods mixed into the user's optimizer class by :func:`DistributedOptimizer` (not used alone)."""

    # ------------------------------------------------------------------ construction
    def _dgc_setup(
        self,
        named_parameters: list[tuple[str, Tensor]],
        config: DGCConfig,
        backward_passes_per_step: int,
        process_set: Any,
        node_groups: Any = None,
    ) -> None:
        self._dgc = HorovodDGCState(config, named_parameters, process_set, node_groups=node_groups)
        self._process_set = hvd.global_process_set if process_set is None else process_set
        self._nodes: NodeBuckets | None = None
        """``hierarchy="node"`` (more than one process): the node buckets."""
        if config.hierarchy == "node" and self._dgc.world_size > 1 and self._process_set.included():
            topo = HorovodNodeTopology.build(self._dgc, self._process_set)
            self._dgc.policy.topology = topo  # "auto" predicts with this rank's share, as under DDP
            trained = {id(p) for g in self.param_groups for p in g["params"] if p.requires_grad}
            self._nodes = NodeBuckets(topo, self._dgc, [(n, p) for n, p in named_parameters if id(p) in trained])
        self._names: dict[Tensor, str] = {p: n for n, p in named_parameters}
        self.backward_passes_per_step = backward_passes_per_step
        self._delay: dict[Tensor, int] = {}
        # p -> None (hook fired on an accumulation pass), _GROUPED, or its group in flight.
        self._handles: dict[Tensor, _Flight | str | None] = {}
        self._synchronized = False
        # A gradient hook fired since the last synchronize(): without one, a second synchronize()
        # has nothing new to send (see synchronize()).
        self._new_grads = False
        self._should_synchronize = True
        self._requires_update: list[Tensor] = []
        self._hook_handles = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._requires_update.append(p)
                    self._delay[p] = backward_passes_per_step
                    self._hook_handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    @property
    def dgc_state(self) -> HorovodDGCState:
        """The DGC state (momentum, residual, ``step``, ``stats``, ``set_masks``)."""
        return self._dgc

    def set_backward_passes_per_step(self, passes: int) -> None:
        _check_passes(passes)
        self.backward_passes_per_step = passes
        for p in self._delay:
            self._delay[p] = passes

    # ------------------------------------------------------------------ Step I: the gradient hook
    def _on_grad(self, p: Tensor) -> None:
        if self._handles.get(p) is not None and self._delay[p] <= 0:
            # Horovod's error (same first sentence), with the numbers and the way out.
            raise AssertionError(
                "Gradients were computed more than backward_passes_per_step times before call "
                f"to step(): parameter {self._names[p]!r} got a gradient after "
                f"backward_passes_per_step={self.backward_passes_per_step} backward passes since "
                "the last step()/synchronize(). Call optimizer.step() after every "
                f"{self.backward_passes_per_step} backward pass(es), or increase "
                "backward_passes_per_step (DistributedOptimizer argument or "
                "set_backward_passes_per_step) to accumulate gradients locally."
            )
        self._new_grads = True
        self._delay[p] -= 1
        self._handles[p] = self._launch(p) if self._delay[p] == 0 else None

    def _launch(self, p: Tensor) -> _Flight | str:
        """A large tensor goes now (sparse allgather, or its dense warm-up allreduce); a small one waits
        for synchronize()'s grouped allreduce."""
        name = self._names[p]
        if p.grad.is_sparse:
            raise TypeError(
                f"dgc.horovod: parameter {name!r} has a sparse gradient (nn.Embedding(sparse=True)); "
                "DGC needs dense gradients: use sparse=False."
            )
        if self._nodes is not None:
            self._nodes.ready(p)
            return _NODE
        if not self._dgc.memory[name].compressed:
            return _GROUPED
        if not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        return self._send([p], p.grad.view(-1), f"dgc.{name}", f"dgc.dense.{name}")

    def _send(self, params: list[Tensor], buffer: Tensor, name: str, dense_name: str) -> _Flight:
        """Encode a group with the codec and launch its collective (named alike on every rank)."""
        state = self._dgc
        t0 = time.perf_counter()
        send = state.codec.encode(state.codec.layout(tuple(self._names[p] for p in params)), buffer)
        t1 = time.perf_counter()
        if send.sparse:
            handle = hvd.allgather_async(send.message, name=name, process_set=self._process_set)
        else:
            handle = hvd.allreduce_async_(send.payload, name=dense_name, op=hvd.Average,
                                          process_set=self._process_set)
        return _Flight(send=send, handle=handle, params=params, started=t1, encode_s=t1 - t0)

    # ------------------------------------------------------------------ Steps II-III
    def synchronize(self) -> None:
        """Finish this step's communication: afterwards ``p.grad`` holds the DGC average.

        A second call with no backward pass since the last one does nothing: ``p.grad`` already
        holds the average (maybe clipped since), and sending it again would feed it through momentum
        and residual a second time and advance the DGC step twice.  (Horovod re-averages there,
        which leaves identical gradients unchanged; ``step()`` still warns, as Horovod does.)  A call
        right after ``step()`` with no backward pass, as ``hvd.broadcast_optimizer_state`` makes,
        is a real step: every parameter sends its current ``p.grad`` (zeros where None).  After a
        ``FloatingPointError`` (``nonfinite="raise"``) the step counts as not synchronized, so a
        retried ``step()`` sends again instead of applying the failed gradients.
        """
        if self._synchronized and not self._new_grads:
            return
        self._new_grads = False
        if not self._process_set.included():
            self._synchronized = True
            return
        # Every rank must submit the same collectives: parameters without a gradient here send zeros,
        # and a synchronize() before the last accumulation pass sends what has accumulated.
        for p in self._requires_update:
            if self._handles.get(p) is None:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._handles[p] = self._launch(p)
        flights = [f for f in self._handles.values() if isinstance(f, _Flight)] + self._launch_groups()
        if self._nodes is not None:
            flights += self._nodes.launch()
        failed = self._settle(flights)
        if self._nodes is not None:
            self._nodes.reset()
        for p in self._delay:
            self._delay[p] = self.backward_passes_per_step
        self._handles.clear()
        state = self._dgc
        step = state.step
        state.end_step(failed=bool(failed))
        if not failed:
            self._decide()
        # After a raised failure nothing valid is in p.grad: leave the step unsynchronized, so that a
        # retried step() sends again (and fails again) instead of applying it.
        self._synchronized = not (failed and state.config.nonfinite == "raise")
        if failed:
            self._nonfinite(failed, step)

    def _decide(self) -> None:
        """``policy="auto"``: choose, for the next step, which large tensors go sparse (rank 0 decides
        and broadcasts; every rank calls this at the end of the same synchronize())."""
        state = self._dgc
        if state.step < state.config.dense_steps or not state.policy.due(state.step, state.density):
            return
        if self._nodes is not None:
            groups = self._nodes.groups()
        else:
            groups = sorted((n,) for n, m in state.memory.items() if m.compressed)
        state.policy.decide(state, groups, lambda t: hvd.broadcast_(
            t, root_rank=0, name="dgc.policy", process_set=self._process_set))

    def _launch_groups(self) -> list[_Flight]:
        """Step II: one allreduce per dtype for the small dense tensors, in a rank-independent order."""
        groups: dict[torch.dtype, list[Tensor]] = {}
        for p in sorted(self._handles, key=self._names.__getitem__):
            if self._handles[p] == _GROUPED:
                groups.setdefault(p.grad.dtype, []).append(p)
        return [
            self._send(params, torch.cat([p.grad.reshape(-1) for p in params]), "", f"dgc.group.{dtype}")
            for dtype, params in sorted(groups.items(), key=lambda kv: str(kv[0]))
        ]

    def _settle(self, flights: list[_Flight]) -> list[str]:
        """Step III: wait for every group, decode it into ``p.grad``, settle the step as a whole (the
        ledger commits every group, or undoes every group when one failed).  Returns the failed names."""
        state, failed, last_done = self._dgc, [], 0.0
        ledger = StepLedger(step=state.step)
        for i in range(len(flights)):
            ledger.launch(last=i == len(flights) - 1)
        for flight in flights:
            send = flight.send
            received = hvd.synchronize(flight.handle)
            arrived = time.perf_counter()
            who = flight.decode(state, received)
            if who is not None:
                send.buffer.fill_(float("nan"))
                failed.extend(send.layout.names)
            elif send.sparse:
                state.policy.observe_codec(send.layout.names, flight.encode_s + time.perf_counter() - arrived)
            else:  # Horovod runs the collectives one after the other
                payload = send.payload.numel() * send.payload.element_size()
                state.policy.observe_dense(payload, state.world_size, arrived - max(flight.started, last_done))
            last_done = arrived
            flight.scatter_back()
            ledger.settle(failed=who, commit=functools.partial(send.commit, state),
                          undo=functools.partial(send.undo, state))
        return failed

    def _nonfinite(self, names: list[str], step: int) -> None:
        shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        if self._dgc.config.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"DGC: non-finite gradient in [{shown}] at step {step} on some worker. No update "
                "was applied and every residual was kept (what this step sent is back in them). Lower the learning rate or clip "
                "gradients, or set DGCConfig(nonfinite='propagate') to hand NaN to "
                "torch.amp.GradScaler."
            )
        # "propagate": p.grad of the affected tensors is NaN, so GradScaler skips the step.

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """``step()`` inside this block does not synchronize (call ``synchronize()`` first)::

            optimizer.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            with optimizer.skip_synchronize():
                optimizer.step()
        """
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    # ------------------------------------------------------------------ Step IV
    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn(
                    "optimizer.step() called without optimizer.skip_synchronize() context after "
                    "optimizer.synchronize(). This can cause training slowdown. You may want to "
                    "consider using optimizer.skip_synchronize() context if you use "
                    "optimizer.synchronize() in your code.",
                    stacklevel=2,
                )
            self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    # Tell torch.optim not to wrap this step() with its profiler/step hooks: the wrapped optimizer's
    # own step() (called above) already runs them, exactly once.
    step.hooked = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._handles:
            raise AssertionError(
                "optimizer.zero_grad() was called after loss.backward() but before "
                "optimizer.step() or optimizer.synchronize(). This is prohibited as it can cause "
                "a race condition (and here it would also drop gradients already folded into the "
                "DGC residual)."
            )
        return super(self.__class__, self).zero_grad(set_to_none)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus ``"dgc"``: this rank's DGC state."""
        sd = super(self.__class__, self).state_dict()
        sd["dgc"] = self._dgc.state_dict()
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a dict without ``"dgc"`` (a plain optimizer's) keeps the
        current DGC state."""
        sd = dict(state_dict)
        dgc_sd = sd.pop("dgc", None)
        self._handles.clear()
        self._synchronized = False
        self._new_grads = False
        self._should_synchronize = True
        for p in self._delay:
            self._delay[p] = self.backward_passes_per_step
        super(self.__class__, self).load_state_dict(sd)
        if dgc_sd is not None:
            self._dgc.load_state_dict(dgc_sd)
            if self._nodes is not None:  # the saved shares may sit at other local ranks: sum them again
                self._nodes.topo.owner_of.clear()


def _check_passes(passes: object) -> None:
    if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
        raise ValueError(
            f"backward_passes_per_step = {passes!r} is invalid: it must be an integer >= 1 "
            "(1 = communicate after every backward pass)."
        )
