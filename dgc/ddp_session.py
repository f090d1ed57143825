"""The DDP hook's bookkeeping for one :class:`~dgc.state.DGCState`: what DDP's bucket callbacks share.

DGC's own memory (momentum, residual, step) lives in the state; this is what only the DDP transport
needs: the futures in flight per bucket, the step's :class:`~dgc.ledger.StepLedger`, and what each
parameter sent this step, so that what was sent for a parameter that then got no gradient (DDP with
``find_unused_parameters`` or ``static_graph`` leaves ``p.grad`` None for a parameter no rank used) goes
back into its residual before the optimizer applies the step.

That give-back runs from an optimizer step pre-hook on *the user's optimizer*: ``dgc.register`` knows it
and calls :meth:`DDPSession.attach_optimizer`.  A state used through the plain
``ddp_model.register_comm_hook(state, dgc.ddp_comm_hook)`` line does not know its optimizer, so until it
is found a global step pre-hook watches the optimizers that step: the first one that holds a parameter of
the state is attached, and the global hook removes itself once no session is left looking.

Nothing of a step outlives it in a gloo thread that needs the GIL (docs/reliability.md#clean-exit): a
gloo worker thread that takes the GIL while the interpreter finalizes calls ``std::terminate``
("terminate called without an active exception").  Three such takers, all seen in core dumps of the
README's toy script: the disposal of a ``Future.then`` Python callback after the future completed
(``PythonFunctionGuard``), which :meth:`DDPSession.finish_step` waits for; the destructor of a ``Work``
whose captured thread-local state holds the Python ``contextvars`` context that ``backward()`` stashes,
which :func:`hook_without_python_tls` keeps out of our collectives; and the same destructor releasing
its tensors (each has a Python object), which holding the works until the next step keeps off the gloo
threads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .accumulation import MicroBatches
from .codec import Send, SentPart
from .hierarchy_dist import TorchNodeTopology
from .ledger import StepLedger
from .state import DGCState

__all__ = ["DDPSession", "Deferred", "Flight", "PostedBucket", "hook_without_python_tls"]

_log = logging.getLogger(__name__)

_RELEASE_WAIT_S = 10.0
"""How long the last bucket's call waits for a gloo thread to drop a completed callback (it only needs
the GIL, which the wait gives up; a timeout is logged, never raised)."""

_BACKWARD_TLS_KEY = "context"
"""The thread-local Python object ``torch.autograd.graph._engine_run_backward`` stashes for the
duration of ``backward()`` (a ``contextvars.Context``)."""


@dataclass
class Flight:
    """One bucket's communication of this step."""

    send: Send
    work: dist.Work
    """Held until the next step: the gloo thread's release of it is then never the last one (the last
    release drops the work's tensors, and a tensor with a Python object takes the GIL)."""
    future: torch.futures.Future[Any]
    """The future of the bucket's ``Future.then`` callback (what DDP waits for)."""
    released: threading.Event
    """Set once the gloo thread that ran the callback has dropped it (:class:`_DropSignal`)."""


@dataclass
class Deferred:
    """A ``hierarchy="node"`` sparse bucket of this step: its stage A is in flight (issued from its hook
    call); :meth:`DDPSession.pump` issues its stage B once stage A has arrived, in launch order."""

    send: Send
    stage_a: dist.Work
    """Stage A (held until the next step)."""
    issue: Callable[[], tuple[dist.Work, Callable[[Any], Any]]]
    """Issues stage B (on the calling thread, a hook call); returns its work and the callback that
    decodes and settles the bucket (Step IV, on a gloo thread, issues no collective)."""
    future: torch.futures.Future[Any]
    """What DDP waits for: completed with the bucket's buffer by the last bucket's call, once every
    stage B of the step has been decoded."""


@dataclass
class PostedBucket:
    """A ``hierarchy="node"`` sparse CPU bucket of this step posted to the node's shared memory
    (:meth:`dgc.hierarchy_dist.TorchNodeTopology.post`): :meth:`DDPSession.complete_posted` sums,
    encodes and launches it from a later hook call, once the node's other processes have posted it."""

    ready: Callable[[], bool]
    """Whether ``run`` would not wait for another process."""
    run: Callable[[], None]
    """Sums this rank's share, encodes it and issues its stage A (:meth:`DDPSession.defer` with
    :attr:`future`)."""
    future: torch.futures.Future[Any]
    """What DDP waits for (handed on to the bucket's :class:`Deferred`)."""


class _DropSignal:
    """A callback wrapper whose only owner is torch's ``PythonFunctionGuard``: it is deallocated (and
    sets ``released``) exactly when the gloo thread drops the callback, under the GIL."""

    __slots__ = ("__weakref__", "_fn", "_released")

    def __init__(self, fn: Callable[[Any], Any], released: threading.Event) -> None:
        self._fn = fn
        self._released = released

    def __call__(self, fut: Any) -> Any:
        return self._fn(fut)

    def __del__(self) -> None:
        self._released.set()


@contextlib.contextmanager
def _backward_tls_removed() -> Iterator[None]:
    """Take the Python object ``backward()`` stashes in torch's thread-local state out for the block,
    so that the ``Work`` objects and callbacks created in it capture no Python object (their
    destructors run on gloo threads); put the same object back after."""
    is_key = getattr(torch._C, "_is_key_in_tls", None)
    if is_key is None or not is_key(_BACKWARD_TLS_KEY):
        yield
        return
    saved = torch._C._get_obj_in_tls(_BACKWARD_TLS_KEY)
    torch._C._remove_obj_from_tls(_BACKWARD_TLS_KEY)
    try:
        yield
    finally:
        torch._C._stash_obj_in_tls(_BACKWARD_TLS_KEY, saved)


def hook_without_python_tls(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Run a DDP communication hook without the ``backward()`` context in torch's thread-local state.

    Every gloo ``Work`` (and every ``then`` callback) captures the caller's thread-local state; the
    gloo worker thread that finishes a collective usually drops the last reference, and releasing a
    captured Python object then takes the GIL: at interpreter exit, ``std::terminate``.  (Plain DDP has
    this race too: its allreduce is issued inside ``backward()``.)"""

    @functools.wraps(hook)
    def run(state: Any, bucket: Any) -> Any:
        with _backward_tls_removed():
            return hook(state, bucket)

    return run


class DDPSession:
    """Per-state bookkeeping of the DDP hook (kept in ``state.transport``; dropped when pickled)."""

    def __init__(self, state: DGCState) -> None:
        self._state = weakref.ref(state)
        self._ledger: StepLedger | None = None
        self._sent: dict[str, SentPart] = {}
        self._optimizer_hook: Any = None
        self._flights: list[Flight] = []
        self._deferred: list[Deferred] = []
        """This step's node-sparse buckets, in launch order."""
        self._issued = 0
        """How many of them have their stage B issued (always a prefix: :meth:`pump`)."""
        self._posted: list[PostedBucket] = []
        """This step's buckets posted to the node's shared memory, in posting order."""
        self._completed = 0
        """How many of them have been run (always a prefix: :meth:`complete_posted`)."""
        self._launched: list[Send] = []
        """This step's groups in launch order (the same on every rank)."""
        self._works: list[dist.Work] = []
        """This step's groups and their futures, until the last bucket's call has waited for them."""
        self._sends: list[Send] = []
        """The last finished step's groups (futures dropped: nothing of ours outlives a step)."""
        self.last_groups: list[tuple[str, ...]] = []
        """The buckets (tensor names) of the last step, in launch order."""
        self._last_done = 0.0
        self._topology: TorchNodeTopology | None = None
        self.micro = MicroBatches()
        """Synchronized micro-batches (gradient accumulation without ``no_sync()``)."""
        _looking.add(self)
        _watch_optimizers()

    @classmethod
    def of(cls, state: DGCState) -> DDPSession:
        """The session of ``state``, created on the first hook call."""
        if not isinstance(state.transport, DDPSession):
            state.transport = cls(state)
        return state.transport

    @property
    def state(self) -> DGCState | None:
        return self._state()

    # ------------------------------------------------------------------ buckets in flight
    def begin(self, state: DGCState, names: tuple[str, ...], buffer: Tensor) -> None:
        """A bucket's hook call starts: a micro-batch of the same optimizer step is replayed
        (:mod:`dgc.accumulation`).  (Its previous communication is over: the last bucket's call of every
        step waits for all of them.)"""
        self.micro.before_encode(state, names, buffer)

    def topology(self, state: DGCState) -> TorchNodeTopology | None:
        """``hierarchy="node"``: the nodes and this node's process group (built at the first call, the
        same point on every rank); None for ``"flat"`` or a single process."""
        if state.config.hierarchy != "node" or state.world_size == 1:
            return None
        if self._topology is None:
            self._topology = TorchNodeTopology.build(state, state.node_groups)
            state.policy.topology = self._topology  # "auto" predicts with this rank's share
        return self._topology

    def optimizer_stepped(self) -> None:
        """The user's optimizer applies the step (from its step pre-hook, or by hand)."""
        self.micro.optimizer_known = True
        self.micro.optimizer_stepped()

    def track(
        self, send: Send, work: dist.Work, callback: Callable[[Any], Any]
    ) -> torch.futures.Future[Any]:
        """``work.get_future().then(callback)`` for a bucket's communication, tracked until the last
        bucket's call: the future to hand DDP."""
        self._launched.append(send)
        return self._then(send, work, callback)

    def _then(self, send: Send, work: dist.Work, callback: Callable[[Any], Any]) -> torch.futures.Future[Any]:
        released = threading.Event()
        fut = work.get_future().then(_DropSignal(callback, released))  # torch: the only reference
        self._flights.append(Flight(send, work, fut, released))
        return fut

    def defer(
        self, send: Send, stage_a: dist.Work, issue: Callable[[], tuple[dist.Work, Callable[[Any], Any]]],
        fut: torch.futures.Future[Any] | None = None,
    ) -> torch.futures.Future[Any]:
        """A bucket whose collectives go on after its hook call (``hierarchy="node"``'s stage B):
        ``stage_a`` is held until the next step, ``issue`` runs from a later hook call (:meth:`pump`) or
        the last bucket's (:meth:`finish_step`); returns the future to hand DDP (``fut``, or a new one;
        completed with the buffer there)."""
        fut = torch.futures.Future() if fut is None else fut
        self._deferred.append(Deferred(send, stage_a, issue, fut))
        self._launched.append(send)
        self._works.append(stage_a)
        return fut

    def post(self, ready: Callable[[], bool], run: Callable[[], None]) -> torch.futures.Future[Any]:
        """A bucket posted to the node's shared memory (:class:`PostedBucket`); returns the future to hand DDP."""
        fut: torch.futures.Future[Any] = torch.futures.Future()
        self._posted.append(PostedBucket(ready, run, fut))
        return fut

    def complete_posted(self, *, wait: bool) -> None:
        """Run the posted buckets not run yet, in posting order: every one but the newest (waiting for the
        node's other processes if need be: at most one bucket stays posted across a hook call), the
        newest too if it is ready or ``wait`` (the last bucket's call, or before a bucket that sums
        inside the node at once)."""
        try:
            while self._completed < len(self._posted):
                item = self._posted[self._completed]
                newest = self._completed == len(self._posted) - 1
                if newest and not wait and not item.ready():
                    return
                self._completed += 1
                item.run()
        except BaseException as exc:
            self._fail_deferred(exc)
            raise

    def pump(self, *, wait: bool = False) -> None:
        """Issue stage B of the deferred buckets whose stage A has arrived, in launch order, stopping at
        the first one still in flight (``wait``: wait for each instead, from the last bucket's call).

        Called from every hook call (the main thread).  When a rank gets to a bucket depends on its own
        stage A and on how far its backward has run, so the issue TIMES of a stage B differ between the
        ranks of a node; its ORDER cannot: every rank issues stage B for the node-sparse buckets
        0, 1, 2, ... of the step (launch order, the same on every rank) and nothing else on the stage-B
        group, so the k-th gather on that group is bucket k's on every rank, whenever it is issued (a
        bucket is never skipped: a later one waits behind an earlier one still in flight)."""
        try:
            while self._issued < len(self._deferred):
                item = self._deferred[self._issued]
                if not wait and not item.stage_a.is_completed():
                    return
                work, callback = item.issue()
                self._issued += 1
                self._then(item.send, work, callback)
        except BaseException as exc:
            self._fail_deferred(exc)
            raise

    def ledger(self, step: int) -> StepLedger:
        """The :class:`~dgc.ledger.StepLedger` of communication step ``step``."""
        if self._ledger is None or self._ledger.step != step or self._ledger.settled:
            self._ledger = StepLedger(step=step)
            self._sent.clear()
            if self._sends:
                self.last_groups = [send.layout.names for send in self._sends]
            self._sends = []
            self._flights.clear()
            self._clear_node_queues()
            self._launched = []
            self._works = []  # the last step's: its collectives are long over
        return self._ledger

    def maybe_decide(self, state: DGCState, ledger: StepLedger) -> None:
        """``policy="auto"``: at the first bucket of a step where a decision is due, rank 0 decides for
        every bucket of the last step and broadcasts (one collective, the same point on every rank)."""
        if ledger.launched or state.step < state.config.dense_steps:
            return
        if not state.policy.due(state.step, state.density):
            return
        group = state.process_group
        src = 0 if group is None else dist.get_global_rank(group, 0)
        state.policy.decide(state, self.last_groups, lambda t: dist.broadcast(t, src=src, group=group))

    def observe(self, state: DGCState, send: Send, started: float, encode_s: float, decode_s: float) -> None:
        """Feed ``policy="auto"`` one group's timings: a dense allreduce (the link), or a sparse codec."""
        now = time.perf_counter()
        if send.sparse:
            state.policy.observe_codec(send.layout.names, encode_s + decode_s)
        else:  # collectives run one after the other: this one started when the previous one ended
            begin = max(started, self._last_done)
            payload = send.payload.numel() * send.payload.element_size()
            state.policy.observe_dense(payload, state.world_size, now - decode_s - begin)
        self._last_done = now - decode_s

    def finish_step(self) -> list[str]:
        """From the last bucket's hook call: issue the remaining stage Bs (:meth:`pump`), wait until every
        bucket of the step has settled, and until the gloo threads have dropped every callback (so that
        none is left to take the GIL at exit), and return the failures (empty when the step arrived
        everywhere)."""
        try:
            self.complete_posted(wait=True)
            self.pump(wait=True)
            for flight in self._flights:
                flight.future.wait()
        except BaseException as exc:
            self._fail_deferred(exc)  # DDP must not wait forever on the deferred buckets
            raise
        finally:  # also when a callback raised: its disposal still takes the GIL
            self._await_release()
        for item in self._deferred:
            item.future.set_result(item.send.buffer)
        self._sends = list(self._launched)
        self._works += [flight.work for flight in self._flights]  # the step's, dropped at the next
        self._flights.clear()
        self._clear_node_queues()
        return list(self._ledger.failures) if self._ledger is not None else []

    def _clear_node_queues(self) -> None:
        """The step's deferred and posted buckets are over (or the step starts)."""
        self._deferred.clear()
        self._issued = 0
        self._posted.clear()
        self._completed = 0

    def _fail_deferred(self, exc: BaseException) -> None:
        """Hand ``exc`` to every deferred or posted bucket's future not completed yet."""
        for item in [*self._deferred, *self._posted]:
            if not item.future.done():
                item.future.set_exception(exc)

    def _await_release(self) -> None:
        late = sum(not flight.released.wait(_RELEASE_WAIT_S) for flight in self._flights)
        if late:
            _log.warning(
                "DGC: %d bucket callback(s) still held by a gloo thread %.0f s after their step; an "
                "interpreter exit now may abort ('terminate called without an active exception').",
                late, _RELEASE_WAIT_S,
            )

    def fail_step(self, fill: float) -> None:
        """Make the failed step's gradients identical on every rank: every bucket buffer and every
        gradient of the step's parameters holds ``fill`` (NaN: GradScaler skips the step; 0: an
        optimizer step that runs anyway changes nothing)."""
        state = self.state
        self.forget_sent()
        self.micro.forget()
        for send in self._sends:
            send.buffer.fill_(fill)
            for name in send.layout.names:
                p = None if state is None else state.param_of(name)
                if p is not None and p.grad is not None:
                    p.grad.fill_(fill)

    # ------------------------------------------------------------------ give-back of unapplied sends
    def note(self, send: Send) -> None:
        """Remember what the group's tensors sent this step (``send.parts``; empty when not tracked)."""
        for part in send.parts:
            self._sent[part.name] = part

    def forget_sent(self) -> None:
        """The step's sends were put back already (the step failed): nothing left to give back."""
        self._sent.clear()

    def reclaim_unapplied(self, params: Iterable[Tensor]) -> list[str]:
        """Give back to the residuals what this step sent for the ``params`` that received no gradient.

        Returns the names given back.  (``zero_grad(set_to_none=False)`` leaves a zero tensor where DDP
        wrote nothing, indistinguishable from a zero average: use the default.)"""
        state = self.state
        if state is None or not self._sent:
            return []
        back = []
        for p in params:
            if p.grad is not None:
                continue
            name = state.name_or_none(p)
            part = None if name is None else self._sent.pop(name, None)
            if part is None:
                continue
            idx = None if part.positions is None else part.positions.long() - part.offset
            state.restore(name, idx, part.values)
            back.append(name)
        return back

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Give back unapplied sends before every ``optimizer.step()`` (replaces an earlier optimizer)."""
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
        optimizer = _unwrap(optimizer)
        ref = weakref.ref(self)

        def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            session = ref()
            if session is not None:
                session.reclaim_unapplied(_params_of(opt))
                session.optimizer_stepped()

        self._optimizer_hook = optimizer.register_step_pre_hook(before_step)
        self.micro.optimizer_known = True
        _looking.discard(self)

    def owns_any(self, optimizer: torch.optim.Optimizer) -> bool:
        state = self.state
        return state is not None and any(
            state.name_or_none(p) is not None for p in _params_of(optimizer)
        )


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (Accelerate's ``.optimizer``, Lightning's
    ``._optimizer``): its ``step()`` is the one that is skipped during accumulation or by GradScaler."""
    while not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            raise TypeError(
                f"dgc.register: {type(optimizer).__name__} is not a torch.optim.Optimizer and wraps none; "
                "pass the torch optimizer that applies the gradients."
            )
        optimizer = inner
    return optimizer


def _params_of(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


# Sessions whose optimizer is not known yet, and the global pre-hook that finds it.
_looking: weakref.WeakSet[DDPSession] = weakref.WeakSet()
_global_hook: Any = None


def _find_optimizer(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _global_hook
    for session in list(_looking):
        if session.owns_any(optimizer):
            session.reclaim_unapplied(_params_of(optimizer))  # this step too
            session.optimizer_stepped()
            session.attach_optimizer(optimizer)
    if not _looking and _global_hook is not None:
        _global_hook.remove()
        _global_hook = None


def _watch_optimizers() -> None:
    global _global_hook
    if _global_hook is None:
        _global_hook = register_optimizer_step_pre_hook(_find_optimizer)
