"""``hierarchy="node"`` over Horovod: the nodes from ``hvd.cross_rank()``/``hvd.local_rank()`` (or given),
one Horovod process set per node, and the collectives of :class:`dgc.hierarchy.NodeTopology`: a
reduce-scatter inside the node onto the share owners, the all-gather of the padded share messages over
the DGC process set, the dense sum, and the migration's sum inside the node.

Horovod 0.28.1 runs a collective on a subset of processes only through a *process set*, and a process
set exists only if it was registered: passed to ``hvd.init(process_sets=[hvd.ProcessSet(ranks), ...])``,
or added after ``hvd.init(process_sets="dynamic")`` (which sets ``HOROVOD_DYNAMIC_PROCESS_SETS=1``) with
``hvd.add_process_set(ranks)``, a call every Horovod process must make.  :func:`node_process_set` reuses a
registered set with the node's ranks, adds one when dynamic sets are on, and otherwise says what to do.
Imports Horovod: imported by :mod:`dgc.horovod_optimizer` only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import horovod.torch as hvd
import torch
from horovod.torch import mpi_ops
from torch import Tensor

from .codec import Send
from .hierarchy import (
    NodePlace,
    NodeTopology,
    check_node_groups,
    node_groups_from_places,
    pack_share,
    unpack_share,
)
from .state import DGCState
from .wire import BucketLayout

__all__ = ["HorovodNodeTopology", "node_groups_of", "node_process_set"]


def _members(process_set: Any) -> list[int]:
    """Global Horovod ranks of the DGC process set, by their rank in the set."""
    ranks = process_set.ranks if process_set is not hvd.global_process_set else None
    return list(ranks) if ranks else list(range(hvd.size()))


def node_groups_of(process_set: Any, node_groups: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """The nodes, as lists of ranks of ``process_set``: ``node_groups`` checked, or found from every
    process's ``hvd.cross_rank()`` and ``hvd.local_rank()`` (one all-gather over the set)."""
    size = process_set.size()
    if node_groups is not None:
        return check_node_groups(node_groups, size)
    mine = torch.tensor([[hvd.cross_rank(), hvd.local_rank()]], dtype=torch.int64)
    rows = hvd.allgather(mine, name="dgc.node.places", process_set=process_set).tolist()
    nodes = node_groups_from_places([NodePlace(node=c, local_rank=lr) for c, lr in rows])
    if len({len(g) for g in nodes}) != 1:
        raise ValueError(
            f"DGCConfig.hierarchy='node': Horovod reports nodes of {[len(g) for g in nodes]} processes "
            "(hvd.local_size() per host); every node must run the same number. Launch equal hosts "
            "(horovodrun -H host1:4,host2:4), pass node_groups=[[0, 1], [2, 3], ...] to "
            "dgc.horovod.DistributedOptimizer, or use hierarchy='flat'."
        )
    return check_node_groups(nodes, size)


def node_process_set(ranks: Sequence[int]) -> Any:
    """The registered Horovod process set of exactly ``ranks`` (global ranks), added if dynamic process
    sets are on (every process must then call this for the same nodes in the same order)."""
    ranks = sorted(ranks)
    if ranks == list(range(hvd.size())):
        return hvd.global_process_set
    for set_id, members in mpi_ops._basics._get_process_set_ids_and_ranks().items():
        if sorted(members) == ranks:
            found = hvd.ProcessSet(ranks)
            found.process_set_id = set_id
            return found
    missing = ValueError(
        f"DGCConfig.hierarchy='node' under Horovod needs a process set per node, and none holds the ranks "
        f"{ranks}. Call hvd.init(process_sets='dynamic') (dgc then adds them), or register them at init: "
        "hvd.init(process_sets=[hvd.ProcessSet(node) for node in nodes]) with the nodes in global ranks."
    )
    # The variable says what the process was started with; hvd.init(process_sets=[...]) after it (or a
    # parent's leftover) turns dynamic sets off again, and Horovod's own error then names hvd.init().
    if os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS") == "1":
        try:
            return hvd.add_process_set(ranks)
        except ValueError as exc:
            raise missing from exc
    raise missing


@dataclass(kw_only=True)
class HorovodNodeTopology(NodeTopology):
    """:class:`~dgc.hierarchy.NodeTopology` whose node is a Horovod process set (``intra``)."""

    process_set: Any
    """The DGC process set: the ranks of :attr:`nodes` are ranks in it; the all-gather runs over it."""

    @classmethod
    def build(cls, state: DGCState, process_set: Any) -> HorovodNodeTopology:
        """The topology of ``state.node_groups`` (already resolved by :func:`node_groups_of`), with one
        process set per node (found, or added in node order on every rank)."""
        nodes = check_node_groups(state.node_groups, state.world_size)
        members = _members(process_set)
        sets = [node_process_set([members[r] for r in g]) for g in nodes]
        node, local = cls.place_of(nodes, state.rank)
        return cls(nodes=nodes, node=node, local_rank=local, intra=sets[node], process_set=process_set)

    # ------------------------------------------------------------------ step 1, asynchronous
    def launch_reduce(self, shares: list[BucketLayout], buffer: Tensor, name: str) -> int:
        """Start step 1: row j of a (local size) x (largest share's elements) matrix holds share j (a
        contiguous range of the bucket), zero-padded; a reduce-scatter (average) inside the node hands
        each local rank its row.  Returns the handle."""
        width = max(sum(s.numels) for s in shares)
        rows = torch.zeros(self.local_size, width, dtype=buffer.dtype, device=buffer.device)
        for j, share in enumerate(shares):
            if share.names:
                rows[j, : sum(share.numels)] = pack_share(share, buffer)
        return hvd.reducescatter_async(rows, name=name, op=hvd.Average, process_set=self.intra)

    def finish_reduce(self, handle: int, shares: list[BucketLayout], buffer: Tensor) -> None:
        """Wait for :meth:`launch_reduce` and put this rank's averaged share into ``buffer``."""
        row = hvd.synchronize(handle).reshape(-1)
        mine = shares[self.local_rank]
        unpack_share(mine, row[: sum(mine.numels)], buffer)

    def _reduce_to_owners(self, state: DGCState, shares: list[BucketLayout], buffer: Tensor) -> None:
        self.finish_reduce(self.launch_reduce(shares, buffer, "dgc.node.reduce"), shares, buffer)

    def _node_sum(self, t: Tensor, name: str) -> None:
        hvd.allreduce_(t, name=name, op=hvd.Sum, process_set=self.intra)

    # ------------------------------------------------------------------ step 3 and the dense sum
    def launch_gather(self, state: DGCState, send: Send, width: int, name: str) -> int:
        """Step 3: every rank's share message, padded to ``width`` bytes, gathered over the DGC set."""
        return hvd.allgather_async(self.padded(state, send, width), name=name, process_set=self.process_set)

    def launch_dense(self, send: Send, name: str) -> int:
        """A dense bucket: the zero-padded payloads summed over every process, divided by the nodes."""
        return hvd.allreduce_async_(send.payload.div_(self.n_nodes), name=name, op=hvd.Sum,
                                    process_set=self.process_set)
