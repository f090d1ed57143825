"""``hierarchy="node"`` over torch.distributed (the DDP hook): one process group per node (``intra``), the
sum of each share onto its owner (through shared memory for CPU tensors, :mod:`dgc.node_shm`, or a
reduce per share), and the migration's all-reduce inside the node.  Everything else is the
transport-neutral :class:`dgc.hierarchy.NodeTopology`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import Tensor

from .hierarchy import (
    NodeTopology,
    check_node_groups,
    node_groups_from_env,
    pack_share,
    unpack_share,
)
from .node_shm import NodeShm, NodeShmUnavailable
from .state import DGCState
from .wire import BucketLayout

__all__ = ["TorchNodeTopology"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TorchNodeTopology(NodeTopology):
    """:class:`~dgc.hierarchy.NodeTopology` with the node's torch.distributed process group."""

    group: dist.ProcessGroup | None = None
    """The DGC process group the node ranks refer to (None: the default group)."""
    node_reduce: str = "auto"
    """``DGCConfig.node_reduce``: how the shares are summed inside the node."""
    _shm: NodeShm | None = field(default=None, repr=False)
    _shm_decided: bool = field(default=False, repr=False)

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
        return cls(nodes=nodes, node=node, local_rank=local, intra=intra, group=group,
                   node_reduce=state.config.node_reduce)

    @staticmethod
    def _global(group: dist.ProcessGroup | None, rank: int) -> int:
        return rank if group is None else dist.get_global_rank(group, rank)

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
