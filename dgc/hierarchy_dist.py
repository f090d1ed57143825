"""``hierarchy="node"`` over torch.distributed (the DDP hook): one process group per node (``intra``), one
per local rank across the nodes (``cross``) and one more per node for stage B alone (``inside``), the sum of each share onto its owner (through shared
memory for CPU tensors, :mod:`dgc.node_shm`, or a reduce per share), the two-stage gather of the share
messages (stage A across the nodes among peers, stage B inside the node) and the migration's all-reduce
inside the node.  Everything else is the transport-neutral :class:`dgc.hierarchy.NodeTopology`."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .codec import Send
from .hierarchy import (
    NodeTopology,
    check_node_groups,
    node_groups_from_env,
    pack_share,
    unpack_share,
)
from .node_shm import NodeShm, NodeShmUnavailable, Posted
from .state import DGCState
from .wire import BucketLayout

__all__ = ["CrossGather", "InsideGather", "PostedShare", "TorchNodeTopology", "all_gather_async"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CrossGather:
    """Stage A of one sparse bucket, in flight: this rank's share message gathered from the same local
    rank of every node."""

    work: dist.Work
    received: Tensor
    """``n_nodes`` padded messages, in the cross group's rank order."""
    width: int
    """The padded message size W."""


@dataclass(kw_only=True)
class InsideGather:
    """Stage B of one sparse bucket, in flight: stage A's ``n_nodes`` messages all-gathered inside the
    node."""

    work: dist.Work
    gathered: Tensor
    """All ``N`` padded messages, rank r's in row :attr:`~dgc.hierarchy.NodeTopology.stage_rows` ``[r]``."""
    issued: float
    """``time.perf_counter()`` when stage B was issued (``policy="auto"`` times the gather inside)."""


@dataclass(kw_only=True)
class PostedShare:
    """A sparse bucket posted to the node's shared memory, not yet summed (:meth:`TorchNodeTopology.post`)."""

    shares: list[BucketLayout]
    posted: Posted


def all_gather_async(out: Tensor, inp: Tensor, group: dist.ProcessGroup | None) -> dist.Work:
    """``inp`` of every rank of ``group`` into ``out``, back to back (async; the DDP hook's gathers too)."""
    # all_gather_single (torch >= 2.10) replaces the deprecated all_gather_into_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, inp, group=group, async_op=True)


@dataclass(kw_only=True)
class TorchNodeTopology(NodeTopology):
    """:class:`~dgc.hierarchy.NodeTopology` with the node's torch.distributed process group."""

    two_stage: bool = True
    group: dist.ProcessGroup | None = None
    """The DGC process group the node ranks refer to (None: the default group)."""
    node_reduce: str = "auto"
    """``DGCConfig.node_reduce``: how the shares are summed inside the node."""
    inside: dist.ProcessGroup | None = None
    """This node's process group for stage B only: nothing else (the shared-memory stage's barrier, the
    migration's sum, which use ``intra``) is ever interleaved with the stage-B gathers on it, so the
    stage-B sequence on it is the same on every rank of the node whenever each rank issues it."""
    across_issued: int = 0
    """Stage A gathers issued so far (over the run)."""
    inside_issued_after: deque[int] = field(default_factory=lambda: deque(maxlen=256))
    """Per stage B issued (the last 256, in order), :attr:`across_issued` at that moment: a stage B
    issued before the step's last sparse bucket's stage A shows that it left the last hook call."""
    _shm: NodeShm | None = field(default=None, repr=False)
    _shm_decided: bool = field(default=False, repr=False)

    @classmethod
    def build(cls, state: DGCState, node_groups: Sequence[Sequence[int]] | None) -> TorchNodeTopology:
        """Check ``node_groups`` (or find the nodes in torchrun's environment) and make one process
        group per node, one per local rank across the nodes and one more per node for stage B (a
        collective call: every rank builds its topology at the same point, and creates every group in
        the same order)."""
        n, rank = state.world_size, state.rank
        nodes = check_node_groups(node_groups if node_groups is not None else node_groups_from_env(n), n)
        group = state.process_group
        node, local = cls.place_of(nodes, rank)
        intra = [dist.new_group([cls._global(group, r) for r in members]) for members in nodes][node]
        made = cls(nodes=nodes, node=node, local_rank=local, intra=intra, group=group,
                   node_reduce=state.config.node_reduce)
        made.cross = [dist.new_group([cls._global(group, r) for r in made.cross_members(j)])
                      for j in range(made.local_size)][local]
        made.inside = [dist.new_group([cls._global(group, r) for r in members]) for members in nodes][node]
        return made

    @staticmethod
    def _global(group: dist.ProcessGroup | None, rank: int) -> int:
        return rank if group is None else dist.get_global_rank(group, rank)

    # ------------------------------------------------------------------ the two-stage gather
    def gather_across(self, state: DGCState, send: Send, width: int) -> CrossGather:
        """Stage A, issued from the bucket's hook call: this rank's share message, padded to ``width``,
        all-gathered with the same local rank of the other nodes (async; ``n_nodes`` messages arrive)."""
        message = self.padded(state, send, width)
        received = state.codec.scratch(send.layout, message.device, "cross", self.n_nodes * width, torch.uint8)
        work = all_gather_async(received, message, self.cross)
        self.sent_across += (self.n_nodes - 1) * width
        self.across_issued += 1
        return CrossGather(work=work, received=received, width=width)

    def gather_inside(self, state: DGCState, send: Send, cross: CrossGather) -> InsideGather:
        """Stage B, issued by :meth:`dgc.ddp_session.DDPSession.pump` once stage A has arrived (buckets
        in launch order on every rank): all-gather stage A's ``n_nodes`` messages inside the node, on
        the stage-B group (async; the caller decodes in its callback)."""
        cross.work.wait()  # arrived already, unless the last bucket's call finishes the step
        part = cross.received
        out = state.codec.scratch(send.layout, part.device, "inside", self.local_size * part.numel(),
                                  torch.uint8)
        self.inside_issued_after.append(self.across_issued)
        issued = time.perf_counter()
        work = all_gather_async(out, part, self.inside)
        # what this rank received: stage A's n messages too (the codec counted stage B's N)
        state.record_received(part.numel())
        return InsideGather(work=work, gathered=out, issued=issued)

    def inside_arrived(self, state: DGCState, inside: InsideGather, arrived: float) -> None:
        """Stage B has arrived (its callback): time it from its issue for ``policy="auto"``."""
        if self.local_size > 1:
            wire = (self.local_size - 1) * inside.gathered.numel() // self.local_size
            state.policy.observe_inside(wire, arrived - inside.issued)

    # ------------------------------------------------------------------ the pipelined shared-memory stage
    def post(self, state: DGCState, layout: BucketLayout, buffer: Tensor) -> PostedShare | None:
        """Step 1's first half for a sparse CPU bucket on shared memory: the other ranks' shares into this
        process's slot (:meth:`NodeShm.post`); the hook goes on, and :meth:`complete` sums and encodes
        at a later hook call, once the node's other processes have posted the bucket too.  None where
        the stage is not pipelined (no shared memory here, or the segment must grow: the same on every
        rank of the node): run :meth:`encode` instead, after completing every bucket posted before."""
        shm = self._node_shm(state, buffer)
        if shm is None or not layout.compressed:
            return None
        shares = self.shares(state, layout)
        if not shm.fits(shares, buffer):
            return None
        return PostedShare(shares=shares, posted=shm.post(shares, buffer))

    def ready(self, posted: PostedShare) -> bool:
        """Whether :meth:`complete` would not wait (every process of the node has posted the bucket)."""
        return self._shm is None or self._shm.ready(posted.posted)

    def wait(self, posted: PostedShare) -> None:
        """Until the node's other processes have posted the bucket (:meth:`complete` then sums at once)."""
        if self._shm is not None:
            self._shm.wait(posted.posted)

    def complete(self, state: DGCState, layout: BucketLayout, posted: PostedShare,
                 buffer: Tensor) -> tuple[Send, list[BucketLayout], int]:
        """Step 1's second half (waits for the node's other processes if need be), then step 2: as
        :meth:`encode` returns."""
        if self._shm is None:
            raise RuntimeError("TorchNodeTopology.complete: the shared-memory stage is gone")
        self._shm.complete(posted.posted)
        send, width = self.encode_share(state, layout, posted.shares, buffer)
        return send, posted.shares, width

    def _node_sum(self, t: Tensor, name: str) -> None:
        dist.all_reduce(t, group=self.intra)

    def _reduce_to_owners(self, state: DGCState, shares: list[BucketLayout], buffer: Tensor) -> None:
        """Through the node's shared memory where it serves (CPU tensors, one host), else one reduce per
        share; then this rank's share, averaged, in ``buffer``."""
        shm = self._node_shm(state, buffer)
        if shm is not None:
            try:
                shm.reduce(shares, buffer)
                return
            except NodeShmUnavailable as exc:  # a larger segment did not fit: on every rank of the node
                self._no_shm(state, exc)
        self._reduce_collective(shares, buffer)

    def _reduce_collective(self, shares: list[BucketLayout], buffer: Tensor) -> None:
        """One reduce per share (the bytes of a reduce-scatter, half those of an allreduce), all in
        flight at once; then this rank's share, averaged, back into ``buffer``."""
        works, mine = [], None
        for j, share in enumerate(shares):
            if not share.names:
                continue
            flat = pack_share(share, buffer)
            dst = self._global(self.group, self.nodes[self.node][j])
            works.append(dist.reduce(flat, dst=dst, group=self.intra, async_op=True))
            if j == self.local_rank:
                mine = flat
        for work in works:
            work.wait()
        if mine is not None:
            unpack_share(shares[self.local_rank], mine.div_(self.local_size), buffer)

    def _node_shm(self, state: DGCState, buffer: Tensor) -> NodeShm | None:
        """The node's shared segment, opened at the first CPU bucket (collective inside the node), or
        None where ``node_reduce`` and the node say collective."""
        if buffer.device.type != "cpu":
            if self.node_reduce == "shm":
                raise ValueError(
                    f"DGCConfig.node_reduce='shm' sums CPU tensors through shared memory; this bucket is on "
                    f"{buffer.device}. Use node_reduce='auto' (shared memory for CPU buckets, the "
                    "collective otherwise) or 'collective'."
                )
            return None
        if not self._shm_decided:
            self._shm_decided = True
            if self.node_reduce != "collective" and self.local_size > 1:
                root = self._global(self.group, self.nodes[self.node][0])
                try:
                    self._shm = NodeShm.open(self.intra, root, self.local_rank, self.local_size)
                except NodeShmUnavailable as exc:
                    self._no_shm(state, exc)
            if state.rank == 0:
                how = "shared memory" if self._shm is not None else "a dist.reduce per share"
                log.info("DGC hierarchy='node': the intra-node sum goes through %s (DGCConfig.node_reduce=%r, "
                         "%d processes per node)", how, self.node_reduce, self.local_size)
        return self._shm

    def _no_shm(self, state: DGCState, exc: NodeShmUnavailable) -> None:
        """Shared memory cannot serve this node: an error with ``node_reduce="shm"``, else the collective."""
        self._shm = None
        if self.node_reduce == "shm":
            raise RuntimeError(
                f"DGCConfig.node_reduce='shm' cannot sum node {self.node} through shared memory: {exc}. Run "
                "the node's processes on one host with room in /dev/shm, or set node_reduce='auto' (falls "
                "back to the collective) or 'collective'."
            ) from exc
        if state.rank == 0:
            log.warning("DGC hierarchy='node': node %d sums through a dist.reduce per share, not shared "
                        "memory: %s", self.node, exc)
