"""``DGCConfig(hierarchy="node")``: dense inside a node, DGC between nodes.

With N processes on ``n`` nodes of ``L`` processes each, flat DGC makes every process receive N-1
messages, most of them over the slow inter-node links.  Here, per bucket:

    1. each local rank owns a share of the bucket's tensors (whole tensors, balanced by message bytes,
       the same split on every node); each share is summed densely inside the node onto its owner (a
       reduce per share over the node's fast links: a reduce-scatter's bytes) and averaged;
    2. each local rank runs DGC on its share only, against the same local rank of the other nodes: its
       momentum and residual hold its share, the rest of its state stays zero;
    3. one all-gather over all processes of the shares' messages (padded to the largest share): a rank
       receives, per node, L messages that together cover the bucket once, so the bytes it receives
       from other nodes are those of about ``n - 1`` whole messages instead of ``(n - 1) L``;
    4. every rank sums the n messages of each share and divides by n.

Every local rank works (no leader idles), every collective is issued from the hook call itself, and the
invariant holds per share: what the owners sent plus their residuals equals the node-averaged,
momentum-corrected gradients.  Dense steps (and ``policy="dense"`` buckets) do the same with a dense
payload: owners put their share's v in the buffer, the others zeros, and one allreduce sums the nodes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .codec import Send
from .state import DGCState
from .wire import FLAG_NONFINITE, BucketLayout, MessageView, unpack_positions, wire_values

__all__ = ["NodeTopology", "node_groups_from_env"]


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


@dataclass(kw_only=True)
class NodeTopology:
    """Where this rank sits: its node's ranks, its local rank, and the node's process group."""

    nodes: list[list[int]]
    """Ranks (of the DGC process group) of every node; all nodes the same size."""
    node: int
    local_rank: int
    intra: dist.ProcessGroup | None
    owner_of: dict[str, int] = field(default_factory=dict)
    """The local rank that holds each tensor's momentum and residual."""

    @property
    def local_size(self) -> int:
        return len(self.nodes[0])

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @classmethod
    def build(cls, state: DGCState, node_groups: Sequence[Sequence[int]] | None) -> NodeTopology:
        """Check ``node_groups`` (or find the nodes in torchrun's environment) and make one process
        group per node (a collective call: every rank builds its topology at the same point)."""
        n, rank = state.world_size, state.rank
        nodes = [list(g) for g in node_groups] if node_groups is not None else node_groups_from_env(n)
        flat = sorted(r for g in nodes for r in g)
        if flat != list(range(n)):
            raise ValueError(
                f"node_groups {nodes} must list every rank 0..{n - 1} exactly once (ranks of the DGC "
                "process group)."
            )
        if len({len(g) for g in nodes}) != 1:
            raise ValueError(
                f"DGCConfig.hierarchy='node' needs the same number of processes on every node; "
                f"node_groups has sizes {[len(g) for g in nodes]}. Launch equal nodes, or use "
                "hierarchy='flat'."
            )
        group = state.process_group
        intra = None
        for members in nodes:  # every rank creates every node's group, in the same order
            ranks = [r if group is None else dist.get_global_rank(group, r) for r in members]
            made = dist.new_group(ranks)
            if rank in members:
                intra = made
        node = next(i for i, g in enumerate(nodes) if rank in g)
        return cls(nodes=nodes, node=node, local_rank=nodes[node].index(rank), intra=intra)

    # ------------------------------------------------------------------ shares
    def owners(self, layout: BucketLayout) -> list[int]:
        """The local rank that owns each tensor of the bucket: by the bytes it puts in a message
        (pairs, or dense entries), largest first, to the least loaded share, so shares are even."""
        pair = layout.index_bytes / max(1, layout.pairs) + layout.value_size
        weight = [k * pair if k else layout.dense_size(i) * layout.value_size
                  for i, k in enumerate(layout.ks)]
        load = [0.0] * self.local_size
        owner = [0] * len(layout.names)
        for i in sorted(range(len(layout.names)), key=lambda i: (-weight[i], -layout.numels[i], i)):
            j = min(range(self.local_size), key=lambda j: (load[j], j))
            owner[i] = j
            load[j] += weight[i]
        return owner

    def shares(self, state: DGCState, layout: BucketLayout) -> list[BucketLayout]:
        """Every local rank's share of the bucket as a layout with bucket positions."""
        owner = self.owners(layout)
        self._migrate(state, layout.names, owner)
        span = sum(layout.numels)
        out = []
        for j in range(self.local_size):
            idx = [i for i in range(len(owner)) if owner[i] == j]
            out.append(state.codec.layout(
                tuple(layout.names[i] for i in idx), sparse=layout.compressed,
                offsets=tuple(layout.offsets[i] for i in idx), span=span,
            ))
        return out

    def _migrate(self, state: DGCState, names: tuple[str, ...], owner: list[int]) -> None:
        """DDP rebuilds its buckets after the first step (and a resumed run starts from other buckets),
        which can move a tensor to another local owner: the holder's momentum and residual move with it
        (an allreduce inside the node, where the others hold zeros), so nothing is lost or left behind."""
        for name, j in zip(names, owner, strict=True):
            before = self.owner_of.get(name)
            self.owner_of[name] = j
            if before == j:  # (None, the first sight: a resumed run's state may sit at another rank)
                continue
            mem = state.memory[name]
            for t in (mem.residual, mem.momentum):
                if t is not None:
                    dist.all_reduce(t, group=self.intra)
                    if j != self.local_rank:
                        t.zero_()

    # ------------------------------------------------------------------ one bucket
    def encode(self, state: DGCState, layout: BucketLayout, buffer: Tensor) -> tuple[Send, list[BucketLayout], int]:
        """Steps 1-2: the node average, then this rank's share through the codec.  Returns the send,
        every share's layout and the padded message size (0 for a dense bucket)."""
        shares = self.shares(state, layout)
        self._reduce_to_owners(state, shares, buffer)
        mine = shares[self.local_rank]
        keep = torch.zeros(buffer.numel(), dtype=torch.bool, device=buffer.device)
        for off, numel in zip(mine.offsets, mine.numels, strict=True):
            keep[off : off + numel] = True
        buffer.masked_fill_(~keep, 0)  # not my share: the owner sends it
        width = max(s.message_bytes for s in shares) if layout.compressed else 0
        send = state.codec.encode(mine, buffer, track=state.track_sent, message_bytes=width,
                                  as_message=layout.compressed)
        if not layout.compressed:
            send.payload, send.live = buffer, None  # every rank reduces the whole (zero-padded) bucket
        return send, shares, width

    def _reduce_to_owners(self, state: DGCState, shares: list[BucketLayout], buffer: Tensor) -> None:
        """Step 1: each share's tensors summed over the node onto their owner, who divides by the node
        size (one reduce per share: the bytes of a reduce-scatter, half those of an allreduce)."""
        group = state.process_group
        for j, share in enumerate(shares):
            if not share.names:
                continue
            parts = [buffer[o : o + n] for o, n in zip(share.offsets, share.numels, strict=True)]
            flat = parts[0] if len(parts) == 1 else torch.cat(parts)
            owner = self.nodes[self.node][j]
            dist.reduce(flat, dst=owner if group is None else dist.get_global_rank(group, owner),
                        group=self.intra)
            if j != self.local_rank:
                continue  # the others' entries are zeroed by the caller
            flat.div_(self.local_size)
            if len(parts) > 1:
                start = 0
                for part in parts:
                    part.copy_(flat[start : start + part.numel()])
                    start += part.numel()

    def decode(self, state: DGCState, shares: list[BucketLayout], gathered: Tensor, width: int, out: Tensor) -> str | None:
        """Steps 3-4: sum each share's n messages into ``out`` (float32 work, divided by n)."""
        rows = gathered.view(-1, width)
        acc = torch.zeros(out.numel(), dtype=torch.float32, device=out.device)
        bad = []
        for j, share in enumerate(shares):
            ranks = [g[j] for g in self.nodes]
            raw = rows[ranks, : share.message_bytes].contiguous().view(-1)
            view = MessageView.of(raw, share, self.n_nodes)
            flags = view.flags.reshape(-1) & FLAG_NONFINITE
            bad += [ranks[i] for i in torch.nonzero(flags).reshape(-1).tolist()]
            if bad or not share.names:
                continue
            pos = unpack_positions(share, view, self.n_nodes).long()
            values, dense = wire_values(share, view, self.n_nodes)  # int8: dequantized
            for r in range(self.n_nodes):  # rank order: the same bits on every rank
                acc.index_add_(0, pos[r], values[r].float())
            if share.dense_numel:
                acc.index_add_(0, state.codec.dense_positions(share, out.device), dense.float().sum(dim=0))
        if bad:
            return f"rank(s) {sorted(bad)}"
        out.copy_(acc.div_(self.n_nodes))
        return None
