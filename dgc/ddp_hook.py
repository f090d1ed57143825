"""DGC as a DDP communication hook: ``ddp_model.register_comm_hook(state, dgc.ddp_comm_hook)``.

A thin transport around :class:`dgc.codec.Codec`.  Per bucket (a flat buffer of several parameters' local
gradients, not yet divided by the world size):

    Step I    the bucket's layout (tensors by parameter *name*: DDP rebuilds its buckets after step 1);
    Step II   encode: the codec compresses every tensor into this worker's fixed-size message (or, for a
              dense bucket, the momentum-corrected payload into the buffer) and counts the traffic;
    Step III  launch ONE collective from the hook call itself: ``all_gather_single`` of the messages or
              ``all_reduce`` of the payload (``hierarchy="node"``, sparse: stage A, the share message
              gathered across the nodes among the same local ranks; its stage B, the gather inside the
              node, is issued from a later hook call once stage A has arrived, buckets in launch order:
              :meth:`~dgc.ddp_session.DDPSession.pump`).  Never from a ``Future.then`` callback:
              callbacks of different buckets run in different orders on different ranks, and gloo then
              pairs the wrong messages (docs/algorithm.md#collectives-from-the-hook-call);
    Step IV   in the callback (node-sparse: stage B's), the codec decodes everybody's contribution into
              the buffer (the average), and the bucket settles in the step's ledger (docs/architecture.md);
    Step V    the last bucket's call issues the stage Bs left (waiting for their stage A, in launch
              order) and waits for the whole step: a failed step is undone everywhere, not counted,
              leaves the same gradients on every rank and raises from ``backward()``.

At the first call (and after every ``load_state_dict``) the ranks compare what must match
(:mod:`dgc.agreement`).

The step is settled as a whole (:mod:`dgc.ledger`): a non-finite gradient in any bucket puts every
bucket's sent values back into the residuals, and the last bucket's call raises once all are settled.
"""

# No `from __future__ import annotations`: DDP inspects the annotation of `bucket` at runtime.

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .agreement import check_agreement, fingerprint
from .codec import Send
from .ddp_session import DDPSession, hook_without_python_tls
from .errors import NonFiniteGradientError
from .hierarchy_dist import TorchNodeTopology, all_gather_async
from .ledger import StepLedger
from .state import DGCState
from .wire import BucketLayout

__all__ = ["ddp_comm_hook"]


@hook_without_python_tls  # nothing of ours takes the GIL in a gloo thread at exit (docs/reliability.md#clean-exit)
def ddp_comm_hook(state: DGCState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average ``bucket`` across workers with Deep Gradient Compression; returns a Future of the buffer."""
    session = DDPSession.of(state)
    buffer = bucket.buffer()
    # Step I
    names = tuple(state.name_of(p) for p in bucket.parameters())
    if not state.agreed:  # first call, or after a load: one small collective
        check_agreement(fingerprint(state, names), _gather_objects(state.process_group))
        state.agreed = True
    session.begin(state, names, buffer)  # synchronized micro-batches replayed
    ledger = session.ledger(state.step)
    session.pump()  # hierarchy="node": stage B of the earlier buckets whose stage A has arrived
    session.maybe_decide(state, ledger)  # policy="auto": sparse or dense, per bucket
    layout = state.codec.layout(names)
    ledger.launch(last=bucket.is_last())  # before the collective: its callback may run at once
    # Step II
    topo = session.topology(state)  # hierarchy="node": dense in the node, DGC on this rank's share
    posted = None if topo is None else topo.post(state, layout, buffer)
    if posted is not None:  # a sparse CPU bucket: summed, encoded and launched once the node has posted it
        def run() -> None:
            topo.wait(posted)  # not the codec's time (policy="auto" times what follows)
            started = time.perf_counter()
            send, shares, width = topo.complete(state, layout, posted, buffer)
            _launch(Launch(state, session, topo, send, shares, width, names, buffer, ledger, started), fut)

        fut = session.post(functools.partial(topo.ready, posted), run)
        session.complete_posted(wait=False)  # the earlier buckets, and this one if the node has posted it
    else:
        started = time.perf_counter()
        if topo is None:
            send = state.codec.encode(layout, buffer, track=state.track_sent, divide=state.world_size)
            shares, width = None, layout.message_bytes
        else:
            session.complete_posted(wait=True)  # the node's shared-memory calls complete in order
            send, shares, width = topo.encode(state, layout, buffer)
        fut = _launch(Launch(state, session, topo, send, shares, width, names, buffer, ledger, started))

    if bucket.is_last():  # Step V: the step as a whole
        failures = session.finish_step()
        if failures:
            _fail(state, session, failures, layout.names)  # not counted; raises unless "propagate"
        else:
            state.end_step()
    return fut


@dataclass
class Launch:
    """One bucket, encoded: what Steps III and IV need."""

    state: DGCState
    session: DDPSession
    topo: TorchNodeTopology | None
    send: Send
    shares: list[BucketLayout] | None
    width: int
    names: tuple[str, ...]
    buffer: Tensor
    ledger: StepLedger
    started: float
    """``time.perf_counter()`` when the encoding started (``policy="auto"`` times the codec)."""


def _launch(b: Launch, fut: torch.futures.Future[Tensor] | None = None) -> torch.futures.Future[Tensor]:
    """Steps III-IV of an encoded bucket: issue its collective now, decode and settle it in the
    callback; returns the future for DDP (``fut``: the one handed to DDP already, for a posted bucket)."""
    state, session, topo, send, buffer = b.state, b.session, b.topo, b.send, b.buffer
    encoded = time.perf_counter()
    session.note(send)

    def settle(failed: str | None, arrived: float) -> None:  # Step IV's end (defined before the
        if not failed:                                        # collective: its callback may run at once)
            session.micro.after_decode(state, b.names, buffer)
            session.observe(state, send, encoded, encoded - b.started, time.perf_counter() - arrived)
        b.ledger.settle(failed=failed, commit=functools.partial(send.commit, state),
                        undo=functools.partial(send.undo, state))

    # Step III
    group, n = state.process_group, state.world_size
    if send.sparse and topo is not None:  # stage A now, stage B once it has arrived (session.pump)
        cross = topo.gather_across(state, send, b.width)
        shares = b.shares

        def stage_b() -> tuple[dist.Work, Callable[[Any], Tensor]]:  # from a later hook call
            inside = topo.gather_inside(state, send, cross)

            def finish_node(done: torch.futures.Future[list[Tensor]]) -> Tensor:  # Step IV
                done.wait()
                arrived = time.perf_counter()
                topo.inside_arrived(state, inside, arrived)
                settle(topo.decode(state, shares, inside.gathered, b.width, buffer, topo.stage_rows), arrived)
                return buffer

            return inside.work, finish_node

        return session.defer(send, cross.work, stage_b, fut)
    if send.sparse:
        received = state.codec.scratch(send.layout, buffer.device, "gathered", n * b.width, torch.uint8)
        work = all_gather_async(received, send.message, group)
    else:
        received = send.payload if topo is None else send.payload.div_(topo.n_nodes)  # flat: divided by N
        work = dist.all_reduce(received, group=group, async_op=True)

    # Step IV
    def finish(done: torch.futures.Future[list[Tensor]]) -> Tensor:
        done.wait()
        arrived = time.perf_counter()
        settle(state.codec.decode(send, received), arrived)
        return buffer

    return session.track(send, work, finish)  # waited for, and its callback dropped, in Step V


def _gather_objects(group: dist.ProcessGroup | None):  # noqa: ANN202
    def gather(obj: object) -> list[object]:
        out: list[object] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    return gather


def _fail(state: DGCState, session: DDPSession, failures: list[str], names: tuple[str, ...]) -> None:
    """A failed step: every residual is back (the ledger undid every bucket), the step is not counted,
    and every rank's gradients are the same: NaN ("propagate": GradScaler skips the step) or zero
    (then ``NonFiniteGradientError``, a ``FloatingPointError``, leaves ``backward()``)."""
    propagate = state.config.nonfinite == "propagate"
    session.fail_step(float("nan") if propagate else 0.0)
    state.end_step(failed=True)
    if propagate:
        return
    shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
    raise NonFiniteGradientError(
        f"DGC: non-finite gradient from {'; '.join(failures)} at step {state.step} (last bucket: "
        f"[{shown}]). No update was applied, every residual was kept and every rank's gradients were "
        "set to zero. Lower the learning rate or clip gradients, or set "
        "DGCConfig(nonfinite='propagate') to hand NaN to torch.amp.GradScaler."
    )
