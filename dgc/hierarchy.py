"""``DGCConfig(hierarchy="node")``: dense inside a node, DGC between nodes (transport-neutral part).

With N processes on ``n`` nodes of ``L`` processes each, flat DGC makes every process receive N-1
messages, most of them over the slow inter-node links.  Here, per bucket (a DDP bucket, or a Horovod
bucket of :mod:`dgc.hierarchy_horovod_steps`):

    1. each local rank owns a share of the bucket: one contiguous range of its elements, cut so that
       the shares' messages are the same size (:mod:`dgc.hierarchy_shards`; a cut inside a tensor
       splits it into pieces, :mod:`dgc.pieces`), the same cut on every node; each share is summed
       densely inside the node onto its owner (a reduce per share, or one reduce-scatter: a
       reduce-scatter's bytes) and averaged;
    2. each local rank runs DGC on its share only, against the same local rank of the other nodes: its
       momentum and residual hold its share, the rest of its state stays zero.  A piece is DGC'd on
       its own: ``k = ceil(density * live elements of the piece)`` pairs chosen by a threshold sampled
       from the piece, so a split tensor sends its top-k per piece (the pieces' ks add up to the
       tensor's, give or take the rounding), not over the whole tensor: the one departure from
       per-tensor top-k, which lets every local rank select without seeing the others' elements;
    3. the share messages (padded to the largest share) cross the nodes in two stages.  DDP: stage A,
       each local rank all-gathers its message with the same local rank of the other nodes only (one
       "cross" process group per local rank), so a node's link carries ``(n - 1) L`` share messages,
       about ``(n - 1)`` whole messages, instead of the ``(N - 1)`` share messages of an all-gather over
       all N processes; stage B, an all-gather inside the node of the ``n`` messages each rank got, so
       every rank holds all ``N`` share messages (:attr:`NodeTopology.stage_rows` says which rank's each
       row is).  Horovod: the same over process sets (one all-gather over all processes where the
       cross sets are not registered);
    4. every rank sums the n messages of each share (in node order: the same bits either way) and
       divides by n.

Every local rank works (no leader idles), and the invariant holds per share: what the owners sent plus
their residuals equals the node-averaged, momentum-corrected gradients.  Dense steps (and
``policy="dense"`` buckets) do the same with a dense payload: owners put their share's v in the buffer,
the others zeros, and one allreduce sums the nodes.

This module holds everything that does not depend on the transport: the nodes and their checks, the
share layouts (from the byte-balanced cuts), the state migration, the encoding of this rank's share and the
decoding of the gathered share messages.  The collectives (the reduce onto the owners inside the node,
the gathers, the migration's sum inside the node) are the transports' own:
:class:`dgc.hierarchy_dist.TorchNodeTopology` (torch.distributed, the DDP hook) and
:class:`dgc.hierarchy_horovod.HorovodNodeTopology` (Horovod process sets).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .codec import Send
from .hierarchy_shards import cut_bucket, share_ranges
from .kernels.reference import divide_sum
from .wire import FLAG_NONFINITE, BucketLayout, MessageView, unpack_positions, wire_values

if TYPE_CHECKING:
    from .state import DGCState

__all__ = [
    "NodePlace",
    "NodeTopology",
    "check_node_groups",
    "node_groups_from_env",
    "node_groups_from_places",
    "pack_share",
    "unpack_share",
]


def node_groups_from_env(world_size: int) -> list[list[int]]:
    """Nodes as torchrun lays out ranks: ``LOCAL_WORLD_SIZE`` consecutive ranks per node."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is None:
        raise ValueError(
            "DGCConfig.hierarchy='node' needs to know the nodes: run under torchrun (it sets "
            "LOCAL_WORLD_SIZE) or pass DGCState(..., node_groups=[[0, 1], [2, 3], ...])."
        )
    size = int(local)
    if size < 1 or world_size % size:
        raise ValueError(
            f"DGCConfig.hierarchy='node': LOCAL_WORLD_SIZE={size} does not divide the world size "
            f"{world_size}; every node must run the same number of processes (or pass node_groups)."
        )
    return [list(range(s, s + size)) for s in range(0, world_size, size)]


@dataclass(frozen=True, slots=True)
class NodePlace:
    """Where one process runs, as its launcher reports it (Horovod: ``hvd.cross_rank()``,
    ``hvd.local_rank()``)."""

    node: int
    """The node's index (Horovod's cross rank)."""
    local_rank: int
    """The process's index inside its node."""


def node_groups_from_places(places: Sequence[NodePlace]) -> list[list[int]]:
    """The nodes (lists of ranks, by local rank) of processes whose places are ``places[rank]``."""
    nodes: dict[int, list[tuple[int, int]]] = {}
    for rank, place in enumerate(places):
        nodes.setdefault(place.node, []).append((place.local_rank, rank))
    return [[rank for _, rank in sorted(members)] for _, members in sorted(nodes.items())]


def check_node_groups(nodes: Sequence[Sequence[int]], world_size: int) -> list[list[int]]:
    """``nodes`` as lists of ranks, each sorted, after checking that they cover ``0..world_size-1``
    once and are all the same size (``ValueError`` naming the fix otherwise)."""
    out = [sorted(int(r) for r in g) for g in nodes]
    flat = sorted(r for g in out for r in g)
    if flat != list(range(world_size)):
        raise ValueError(
            f"node_groups {out} must list every rank 0..{world_size - 1} exactly once (ranks of the DGC "
            "process group or Horovod process set)."
        )
    if len({len(g) for g in out}) != 1:
        raise ValueError(
            f"DGCConfig.hierarchy='node' needs the same number of processes on every node; the nodes "
            f"have sizes {[len(g) for g in out]}. Launch equal nodes, pass node_groups with equal "
            "groups, or use hierarchy='flat'."
        )
    return out


def pack_share(share: BucketLayout, buffer: Tensor) -> Tensor:
    """The share's entries of ``buffer`` back to back (a view when its tensors are adjacent there)."""
    spans = list(zip(share.offsets, share.numels, strict=True))
    if not spans:
        return buffer[:0]
    if all(o == spans[i][0] + spans[i][1] for i, (o, _) in enumerate(spans[1:])):
        return buffer[spans[0][0] : spans[-1][0] + spans[-1][1]]
    return torch.cat([buffer[o : o + n] for o, n in spans])


def unpack_share(share: BucketLayout, flat: Tensor, buffer: Tensor) -> None:
    """Write ``flat`` (the share's entries back to back) into their places in ``buffer``."""
    start = 0
    for off, numel in zip(share.offsets, share.numels, strict=True):
        part = buffer[off : off + numel]
        if part.data_ptr() != flat.data_ptr() + start * flat.element_size():
            part.copy_(flat[start : start + numel])
        start += numel


@dataclass(kw_only=True)
class NodeTopology:
    """Where this rank sits (its node's ranks, its local rank), and the transport-neutral steps.

    A transport subclasses it with its collectives: :meth:`_reduce_to_owners` (step 1) and
    :meth:`_node_sum` (the migration); it issues the gathers (step 3) itself."""

    nodes: list[list[int]]
    """Ranks (of the DGC process group or Horovod process set) of every node; all nodes the same size."""
    node: int
    local_rank: int
    intra: Any = None
    """The transport's handle of this rank's node (a torch process group, a Horovod process set; None
    where nothing is communicated, e.g. a cost model's split)."""
    cross: Any = None
    """The transport's handle of this rank's cross group: the ranks of the same local rank on every node
    (DDP's stage A; None where the transport gathers over all processes at once, or nothing is
    communicated)."""
    two_stage: bool = False
    """Whether the share messages cross the nodes among peers and are then gathered inside the node
    (the DDP hook; Horovod with its cross process sets), or go in one all-gather over all processes
    (Horovod without them); the cost model follows."""
    sent_across: int = 0
    """Bytes this rank has handed to collectives over ranks of other nodes, times the peers each went
    to (an all-gather of W bytes over g ranks: (g - 1) W), summed over the run (DDP's stage A)."""
    owner_of: dict[str, tuple[tuple[int, int, int], ...]] = field(default_factory=dict)
    """Per parameter, its element ranges and the local rank that holds each one's momentum and
    residual: ``((start, stop, local rank), ...)`` (cleared: every parameter is placed again)."""
    loads: int = 0
    """``DGCState.loads`` when :attr:`owner_of` was last right (a load places everything again)."""

    @property
    def local_size(self) -> int:
        return len(self.nodes[0])

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def cross_members(self, local_rank: int) -> list[int]:
        """The ranks of local rank ``local_rank`` on every node, in the cross group's rank order
        (ascending: a process group orders its ranks so)."""
        return sorted(g[local_rank] for g in self.nodes)

    @property
    def stage_rows(self) -> list[int]:
        """Per rank, its message's row in the two-stage gather: stage B stacks the local ranks' stage-A
        results (by local rank), each holding its cross group's messages in that group's rank order."""
        order = [r for j in range(self.local_size) for r in self.cross_members(j)]
        rows = [0] * len(order)
        for row, rank in enumerate(order):
            rows[rank] = row
        return rows

    @staticmethod
    def place_of(nodes: list[list[int]], rank: int) -> tuple[int, int]:
        """(node, local rank) of ``rank``."""
        node = next(i for i, g in enumerate(nodes) if rank in g)
        return node, nodes[node].index(rank)

    # ------------------------------------------------------------------ the transport's collectives
    def _reduce_to_owners(self, state: DGCState, shares: list[BucketLayout], buffer: Tensor) -> None:
        """Step 1: each share's entries of ``buffer`` summed over the node onto its owner, who divides by
        the node size (the other entries of ``buffer`` are then free: :meth:`encode_share` zeroes them
        for a dense bucket, leaves them for a sparse one)."""
        raise NotImplementedError

    def _node_sum(self, t: Tensor, name: str) -> None:
        """Sum ``t`` in place over this rank's node (``name``: a name the same on every rank)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shares
    def plan(self, state: DGCState, layout: BucketLayout) -> list[BucketLayout]:
        """Every local rank's share of the bucket (contiguous element ranges, message-balanced, see
        :mod:`dgc.hierarchy_shards`) as a layout with bucket positions; tensors cut by a share's
        boundary appear as pieces (no collective)."""
        cuts = cut_bucket(layout, self.local_size)
        span = sum(layout.numels)
        out = []
        for ranges in share_ranges(layout, cuts):
            names = tuple(state.piece(layout.names[r.index], r.start, r.stop)
                          if r.stop > r.start else layout.names[r.index] for r in ranges)
            offsets = tuple(layout.offsets[r.index] + r.start for r in ranges)
            out.append(state.codec.layout(names, sparse=layout.compressed, offsets=offsets, span=span))
        return out

    def shares(self, state: DGCState, layout: BucketLayout) -> list[BucketLayout]:
        """:meth:`plan`, then :meth:`migrate` the state of parameters whose ranges or owners changed."""
        shares = self.plan(state, layout)
        self.migrate(state, shares)
        return shares

    @staticmethod
    def ranges_of(state: DGCState, shares: list[BucketLayout]) -> dict[str, tuple[tuple[int, int, int], ...]]:
        """Per parameter of the shares, its ``(start, stop, local rank)`` ranges, ascending."""
        out: dict[str, list[tuple[int, int, int]]] = {}
        for j, share in enumerate(shares):
            for name in share.names:
                piece = state.piece_of(name)
                if piece is None:
                    out.setdefault(name, []).append((0, state.memory[name].numel, j))
                else:
                    out.setdefault(piece.parent, []).append((piece.start, piece.stop, j))
        return {name: tuple(sorted(r)) for name, r in out.items()}

    def migrate(self, state: DGCState, shares: list[BucketLayout]) -> None:
        """DDP rebuilds its buckets after the first step, a resumed run may cut them differently, and
        the cuts follow the message weights (density, policy): a parameter's ranges or their owners can
        change.  Then its momentum and residual are summed inside the node (the non-owners of each
        element hold zeros there, so the sum is exact) and each rank keeps the ranges it now owns,
        zeros elsewhere: nothing is lost or left behind.  A parameter seen for the first time (or after
        a load) is summed too: a resumed run's state may sit at other ranks.  All of them go in one
        sum per dtype and device."""
        if self.loads != state.loads:
            self.owner_of.clear()
            self.loads = state.loads
        moved: dict[tuple[torch.dtype, torch.device], list[tuple[Tensor, list[tuple[int, int]]]]] = {}
        for name, ranges in self.ranges_of(state, shares).items():
            if self.owner_of.get(name) == ranges:
                continue
            self.owner_of[name] = ranges
            mem = state.memory[name]
            mine = [(a, b) for a, b, j in ranges if j == self.local_rank]
            for t in (mem.residual, mem.momentum):
                if t is not None:
                    moved.setdefault((t.dtype, t.device), []).append((t, mine))
        for (dtype, device), tensors in moved.items():
            flat = torch.cat([t.reshape(-1) for t, _ in tensors])
            self._node_sum(flat, f"dgc.node.migrate.{str(dtype).removeprefix('torch.')}.{device.type}")
            start = 0
            for t, mine in tensors:
                summed = flat[start : start + t.numel()]
                t.zero_()
                for a, b in mine:
                    t[a:b].copy_(summed[a:b])
                start += t.numel()

    # ------------------------------------------------------------------ one bucket
    def encode(self, state: DGCState, layout: BucketLayout, buffer: Tensor) -> tuple[Send, list[BucketLayout], int]:
        """Steps 1-2 with blocking collectives: the node average, then this rank's share through the
        codec.  Returns the send, every share's layout and the padded message size (0: dense)."""
        shares = self.shares(state, layout)
        self._reduce_to_owners(state, shares, buffer)
        send, width = self.encode_share(state, layout, shares, buffer)
        return send, shares, width

    def encode_share(self, state: DGCState, layout: BucketLayout, shares: list[BucketLayout],
                     buffer: Tensor) -> tuple[Send, int]:
        """Step 2, once ``buffer`` holds the node average of this rank's share: the share goes through
        the codec, and its entries alone are checked for finiteness (a non-finite entry of another
        share reached that share's owner, whose check fails the step everywhere).  Returns the send and
        the padded message size (0 for a dense bucket, whose payload is the whole zero-padded buffer,
        to be summed over all processes after a division by :attr:`n_nodes`)."""
        mine = shares[self.local_rank]
        if not layout.compressed:
            self._zero_others(mine, buffer)
        # A sparse bucket leaves the other entries as step 1 left them (stale local values): nothing
        # reads them before :meth:`decode` overwrites all of ``out``.  The codec reads this share's
        # entries only; what a failed step settles (the ledger's undo, the give-back of unapplied sends)
        # is in the send's positions and values, never in the buffer; a failed decode leaves the buffer
        # to the transport, which fills all of it (NaN or 0) on every rank; the micro-batch replay reads
        # the buffer before step 1 (``before_encode``) and after decode (``after_decode``).
        width = max(s.message_bytes for s in shares) if layout.compressed else 0
        # a dense bucket: every rank reduces the whole (zero-padded) bucket, and counts it
        send = state.codec.encode(mine, buffer, track=state.track_sent, message_bytes=width,
                                  as_message=layout.compressed, whole=not layout.compressed,
                                  finite_of=pack_share(mine, buffer))
        return send, width

    @staticmethod
    def _zero_others(mine: BucketLayout, buffer: Tensor) -> None:
        """Zero every entry of ``buffer`` outside the share ``mine`` (a dense bucket's payload is the
        whole buffer, summed over every process: the other shares' owners send those entries)."""
        start = 0
        for off, numel in sorted(zip(mine.offsets, mine.numels, strict=True)):
            buffer[start:off].zero_()
            start = off + numel
        buffer[start:].zero_()

    def padded(self, state: DGCState, send: Send, width: int) -> Tensor:
        """This rank's message in ``width`` bytes (every share's message is padded to the largest)."""
        message = send.message
        if message.numel() == width:
            return message
        out = state.codec.scratch(send.layout, message.device, "padded", width, torch.uint8)
        out[: message.numel()].copy_(message)
        return out

    def decode(self, state: DGCState, shares: list[BucketLayout], gathered: Tensor, width: int, out: Tensor,
               rows_of: Sequence[int] | None = None) -> str | None:
        """Steps 3-4: sum each share's n messages into ``out`` (float32 work, divided by n); ``gathered``
        holds every rank's padded message, by rank, or rank r's in row ``rows_of[r]`` (the two-stage
        gather's :attr:`stage_rows`).  Returns None, or who sent a non-finite gradient (``out`` is
        then left as it was)."""
        rows = gathered.view(-1, width)
        views = []
        bad: list[int] = []
        for j, share in enumerate(shares):
            ranks = [g[j] for g in self.nodes]
            at = ranks if rows_of is None else [rows_of[r] for r in ranks]
            raw = rows[at, : share.message_bytes].contiguous().view(-1)
            views.append(MessageView.of(raw, share, self.n_nodes))
            flags = views[-1].flags.reshape(-1) & FLAG_NONFINITE
            bad += [ranks[i] for i in torch.nonzero(flags).reshape(-1).tolist()]
        if bad:
            return f"rank(s) {sorted(bad)}"
        if out.dtype == torch.float32:  # accumulate in place: no bucket-sized temporary
            acc = out.zero_()
        else:
            acc = state.codec.scratch(shares[self.local_rank], out.device, "node_sum", out.numel(), torch.float32)
            acc.zero_()
        touched: list[Tensor] = []
        for share, view in zip(shares, views, strict=True):
            if not share.names:
                continue
            pos = unpack_positions(share, view, self.n_nodes).long()
            values, dense = wire_values(share, view, self.n_nodes)  # int8: dequantized
            for r in range(self.n_nodes):  # rank order: the same bits on every rank
                acc.index_add_(0, pos[r], values[r].float())
            touched.append(pos.reshape(-1))
            if share.dense_numel:
                at = state.codec.dense_positions(share, out.device)
                acc.index_add_(0, at, dense.float().sum(dim=0))
                touched.append(at)
        if touched:  # only the summed positions (the rest is 0 = 0 / n): no pass over the bucket
            divide_sum(acc, torch.cat(touched), self.n_nodes)
        if acc is not out:
            out.copy_(acc)
        return None
