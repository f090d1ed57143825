"""``hierarchy="node"`` over torch.distributed (the DDP hook): one process group per node (``intra``), a
reduce per share onto its owner, and the migration's all-reduce inside the node.  Everything else is the
transport-neutral :class:`dgc.hierarchy.NodeTopology`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from .hierarchy import (
    NodeTopology,
    check_node_groups,
    node_groups_from_env,
    pack_share,
    unpack_share,
)
from .state import DGCState
from .wire import BucketLayout

__all__ = ["TorchNodeTopology"]


@dataclass(kw_only=True)
class TorchNodeTopology(NodeTopology):
    """:class:`~dgc.hierarchy.NodeTopology` with the node's torch.distributed process group."""

    group: dist.ProcessGroup | None = None
    """The DGC process group the node ranks refer to (None: the default group)."""

    @classmethod
    def build(cls, state: DGCState, node_groups: Sequence[Sequence[int]] | None) -> TorchNodeTopology:
        """Check ``node_groups`` (or find the nodes in torchrun's environment) and make one process
        group per node (a collective call: every rank builds its topology at the same point)."""
        n, rank = state.world_size, state.rank
        nodes = check_node_groups(node_groups if node_groups is not None else node_groups_from_env(n), n)
        group = state.process_group
        intra = None
        for members in nodes:  # every rank creates every node's group, in the same order
            made = dist.new_group([cls._global(group, r) for r in members])
            if rank in members:
                intra = made
        node, local = cls.place_of(nodes, rank)
        return cls(nodes=nodes, node=node, local_rank=local, intra=intra, group=group)

    @staticmethod
    def _global(group: dist.ProcessGroup | None, rank: int) -> int:
        return rank if group is None else dist.get_global_rank(group, rank)

    def _node_sum(self, t: Tensor, name: str) -> None:
        dist.all_reduce(t, group=self.intra)

    def _reduce_to_owners(self, state: DGCState, shares: list[BucketLayout], buffer: Tensor) -> None:
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
