"""``hierarchy="node"`` in the Horovod optimizer: the step of :mod:`dgc.hierarchy` per bucket.

Horovod has no buckets of its own, so the optimizer's parameters are put in fixed buckets as DDP would
(reverse parameter order, one open bucket per dtype, closed at :data:`BUCKET_CAP_BYTES`), the same on
every rank: a bucket's reduce starts as soon as its last gradient is ready, while the backward pass goes
on.  Each bucket is cut into contiguous element shares, one per local rank (:mod:`dgc.hierarchy_shards`;
a cut inside a tensor splits it into pieces).  Per step:

    hook         (the gradient hook of a bucket's last parameter) the bucket's gradients are concatenated
                 and the reduce-scatter onto the share owners inside the node is launched (the shares as
                 rows, padded to the largest share's elements), overlapping the rest of the backward
                 pass;
    synchronize  per bucket, in bucket order: the migration of moved state (first step, or after a
                 load), the wait for the reduce, this rank's share through the codec, and stage A (the
                 padded share message all-gathered with the same local rank of the other nodes) or the
                 dense sum is launched; after each bucket, every earlier bucket whose stage A has arrived
                 (``hvd.poll``) gets its stage B (stage A's n messages all-gathered inside the node);
                 then the stage Bs left are issued in bucket order, each once its stage A has arrived,
                 and the optimizer waits for every bucket and decodes it like any other
                 :class:`~dgc.horovod_flight.Flight` (the N messages in the two-stage order,
                 :attr:`~dgc.hierarchy.NodeTopology.stage_rows`).  Horovod pairs collectives by name, so
                 the ranks may issue the stage Bs in different orders.  Without cross process sets
                 (:func:`~dgc.hierarchy_horovod.cross_process_sets`) one all-gather over all processes
                 replaces both stages.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import horovod.torch as hvd
import torch
from torch import Tensor

from .codec import Send
from .hierarchy_horovod import HorovodNodeTopology
from .horovod_flight import Flight
from .state import DGCState
from .wire import BucketLayout

__all__ = ["BUCKET_CAP_BYTES", "NodeBuckets", "StageA", "plan_buckets"]

BUCKET_CAP_BYTES = 25 * 2**20
"""Bytes of gradients per bucket (DDP's default ``bucket_cap_mb=25``): larger buckets split more evenly
into shares, smaller ones start their reduce earlier in the backward pass."""


def plan_buckets(named: list[tuple[str, Tensor]], cap_bytes: int = BUCKET_CAP_BYTES) -> list[list[tuple[str, Tensor]]]:
    """Buckets of ``named`` parameters: reverse order (about the order their gradients arrive), one open
    bucket per dtype, closed once it holds ``cap_bytes`` or more."""
    done: list[list[tuple[str, Tensor]]] = []
    open_: dict[torch.dtype, list[tuple[str, Tensor]]] = {}
    size: dict[torch.dtype, int] = {}
    for name, p in reversed(named):
        bucket = open_.setdefault(p.dtype, [])
        bucket.append((name, p))
        size[p.dtype] = size.get(p.dtype, 0) + p.numel() * p.element_size()
        if size[p.dtype] >= cap_bytes:
            done.append(open_.pop(p.dtype))
            size[p.dtype] = 0
    return done + [b for b in open_.values() if b]


@dataclass(kw_only=True)
class NodeBucket:
    """One bucket and its communication of the current step."""

    index: int
    params: list[Tensor]
    names: tuple[str, ...]
    ready: int = 0
    """Parameters whose gradient is final this step."""
    buffer: Tensor | None = None
    layout: BucketLayout | None = None
    shares: list[BucketLayout] = field(default_factory=list)
    handle: int | None = None
    """The reduce-scatter in flight (None: not launched this step)."""


@dataclass(kw_only=True)
class StageA:
    """A sparse bucket whose stage A is in flight (or whose stage B is issued): what its
    :class:`~dgc.horovod_flight.Flight` needs once stage B is."""

    bucket: NodeBucket
    send: Send
    width: int
    """The padded message size W."""
    handle: int
    """Stage A's handle (all-gather over the cross set)."""
    started: float
    encode_s: float
    inside: int | None = None
    """Stage B's handle, once issued."""


class NodeBuckets:
    """The buckets of one optimizer and their per-step communication over a :class:`HorovodNodeTopology`."""

    def __init__(self, topo: HorovodNodeTopology, state: DGCState, named: list[tuple[str, Tensor]]) -> None:
        self.topo = topo
        self.state = state
        self.buckets = [
            NodeBucket(index=i, params=[p for _, p in b], names=tuple(n for n, _ in b))
            for i, b in enumerate(plan_buckets(named))
        ]
        self._bucket_of = {p: b for b in self.buckets for p in b.params}

    def groups(self) -> list[tuple[str, ...]]:
        """The buckets that hold a compressible tensor (what ``policy="auto"`` decides on)."""
        memory = self.state.memory
        return [b.names for b in self.buckets if any(memory[n].compressed for n in b.names)]

    def ready(self, p: Tensor) -> None:
        """``p``'s gradient is final this step: once its bucket is complete, its reduce starts."""
        bucket = self._bucket_of[p]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._reduce(bucket)

    def _reduce(self, b: NodeBucket) -> None:
        state = self.state
        b.buffer = torch.cat([p.grad.reshape(-1) for p in b.params])
        b.layout = state.codec.layout(b.names)
        b.shares = self.topo.plan(state, b.layout)
        b.handle = self.topo.launch_reduce(b.shares, b.buffer, f"dgc.node.reduce.{b.index}")

    def launch(self) -> list[Flight]:
        """From ``synchronize()`` (every parameter is ready): every bucket's share encoded and its stage A
        (or one-stage all-gather, or dense sum) launched, in bucket order, with the stage Bs issued as
        their stage As arrive; returns when every stage B is issued."""
        launched: list[Flight | StageA] = []
        for b in self.buckets:
            if b.handle is None:
                self._reduce(b)
            launched.append(self._encode(b))
            self._pump(launched, wait=False)
        self._pump(launched, wait=True)
        return [x if isinstance(x, Flight) else self._flight(x) for x in launched]

    def _pump(self, launched: list[Flight | StageA], wait: bool) -> None:
        """Issue stage B of every bucket whose stage A has arrived (``wait``: of every bucket, waiting
        for its stage A, in bucket order)."""
        for a in launched:
            if isinstance(a, StageA) and a.inside is None and (wait or hvd.poll(a.handle)):
                across = hvd.synchronize(a.handle)
                a.inside = self.topo.launch_inside(self.state, across, f"dgc.node.inside.{a.bucket.index}")

    def _encode(self, b: NodeBucket) -> Flight | StageA:
        topo, state = self.topo, self.state
        topo.migrate(state, b.shares)
        t0 = time.perf_counter()
        topo.finish_reduce(b.handle, b.shares, b.buffer)
        send, width = topo.encode_share(state, b.layout, b.shares, b.buffer)
        t1 = time.perf_counter()
        if send.sparse and topo.two_stage:
            handle = topo.launch_across(state, send, width, f"dgc.node.across.{b.index}")
            return StageA(bucket=b, send=send, width=width, handle=handle, started=t1, encode_s=t1 - t0)
        if send.sparse:
            handle = topo.launch_gather(state, send, width, f"dgc.node.gather.{b.index}")
            decoder = functools.partial(topo.decode, state, b.shares, width=width, out=b.buffer)
        else:
            handle, decoder = topo.launch_dense(send, f"dgc.node.dense.{b.index}"), None
        return Flight(send=send, handle=handle, params=b.params, started=t1, encode_s=t1 - t0,
                      group=b.layout, decoder=decoder)

    def _flight(self, a: StageA) -> Flight:
        """The flight of a bucket whose stage B is issued: decoded from stage B's rows."""
        b, topo = a.bucket, self.topo
        if a.inside is None:
            raise RuntimeError(f"dgc: node bucket {b.index}'s stage B was never issued (NodeBuckets.launch pumps "
                               "every stage A before building the flights)")
        decoder = functools.partial(topo.decode, self.state, b.shares, width=a.width, out=b.buffer,
                                    rows_of=topo.stage_rows)
        return Flight(send=a.send, handle=a.inside, params=b.params, started=a.started, encode_s=a.encode_s,
                      group=b.layout, decoder=decoder)

    def reset(self) -> None:
        """The step is over: nothing ready, nothing in flight."""
        for b in self.buckets:
            b.ready, b.handle, b.buffer = 0, None, None
