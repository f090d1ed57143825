"""``hierarchy="node"`` over Horovod: the nodes from ``hvd.cross_rank()``/``hvd.local_rank()`` (or given),
one Horovod process set per node and one per local rank across the nodes ("cross"), and the collectives
of :class:`dgc.hierarchy.NodeTopology`: a reduce-scatter inside the node onto the share owners, the
two-stage all-gather of the padded share messages (stage A over the cross set, stage B inside the node;
one all-gather over the DGC process set where the cross sets are not registered), the dense sum, and the
migration's sum inside the node.

Horovod 0.28.1 runs a collective on a subset of processes only through a *process set*, and a process
set exists only if it was registered: passed to ``hvd.init(process_sets=[hvd.ProcessSet(ranks), ...])``,
or added after ``hvd.init(process_sets="dynamic")`` (which sets ``HOROVOD_DYNAMIC_PROCESS_SETS=1``) with
``hvd.add_process_set(ranks)``, a call every Horovod process must make.  :func:`node_process_set` reuses a
registered set with the node's ranks, adds one when dynamic sets are on, and otherwise says what to do.
:func:`cross_process_sets` does the same for the cross sets, all or none: without them (process sets
fixed at ``hvd.init`` without the cross sets) the messages go in one all-gather over all processes, and
rank 0 logs why once.  Imports Horovod: imported by :mod:`dgc.horovod_optimizer` only.
"""

from __future__ import annotations

import logging
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

__all__ = ["HorovodNodeTopology", "cross_process_sets", "node_groups_of", "node_process_set"]

log = logging.getLogger(__name__)

_SAID: set[str] = set()
"""Reasons already logged (once per process) for gathering the share messages in one stage."""


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


def registered_process_set(ranks: Sequence[int]) -> Any | None:
    """The registered Horovod process set of exactly ``ranks`` (global ranks; all of them: the global
    set), or None."""
    ranks = sorted(ranks)
    if ranks == list(range(hvd.size())):
        return hvd.global_process_set
    for set_id, members in mpi_ops._basics._get_process_set_ids_and_ranks().items():
        if sorted(members) == ranks:
            found = hvd.ProcessSet(ranks)
            found.process_set_id = set_id
            return found
    return None


def _dynamic() -> bool:
    """Whether the process was started with dynamic process sets.  The variable says what the process was
    started with; hvd.init(process_sets=[...]) after it (or a parent's leftover) turns dynamic sets off
    again, and ``hvd.add_process_set`` then raises ``ValueError`` naming hvd.init()."""
    return os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS") == "1"


def node_process_set(ranks: Sequence[int]) -> Any:
    """The registered Horovod process set of exactly ``ranks`` (global ranks), added if dynamic process
    sets are on (every process must then call this for the same nodes in the same order)."""
    ranks = sorted(ranks)
    found = registered_process_set(ranks)
    if found is not None:
        return found
    missing = ValueError(
        f"DGCConfig.hierarchy='node' under Horovod needs a process set per node, and none holds the ranks "
        f"{ranks}. Call hvd.init(process_sets='dynamic') (dgc then adds them), or register them at init: "
        "hvd.init(process_sets=[hvd.ProcessSet(node) for node in nodes]) with the nodes in global ranks."
    )
    if _dynamic():
        try:
            return hvd.add_process_set(ranks)
        except ValueError as exc:
            raise missing from exc
    raise missing


@dataclass(frozen=True, slots=True)
class CrossSets:
    """The cross process sets of every local rank (stage A), or why there are none."""

    sets: list[Any] | None
    """Per local rank, its process set (global ranks of that local rank on every node); None: the share
    messages go in one all-gather over the DGC process set."""
    why: str = ""
    """Why :attr:`sets` is None (empty otherwise)."""


def cross_process_sets(groups: Sequence[Sequence[int]]) -> CrossSets:
    """The process sets of ``groups`` (per local rank, the global ranks of that local rank on every
    node), all or none: the registered ones, the others added in local-rank order when dynamic process
    sets are on (every process calls this at the same point with the same groups, and the registry is
    the same on every process, so every process adds the same sets in the same order); none where a set
    is missing and cannot be added."""
    found = [registered_process_set(g) for g in groups]
    missing = [sorted(g) for g, s in zip(groups, found, strict=True) if s is None]
    if not missing:
        return CrossSets(sets=found)
    if not _dynamic():
        return CrossSets(sets=None, why=(
            f"no process set holds the ranks {missing} of the same local rank on every node, and process "
            "sets are fixed at hvd.init(). Call hvd.init(process_sets='dynamic') (dgc then adds them), or "
            "register them at init beside the node sets: hvd.init(process_sets=[*(hvd.ProcessSet(node) "
            "for node in nodes), *(hvd.ProcessSet(peers) for peers in zip(*nodes))])"))
    try:
        return CrossSets(sets=[s if s is not None else hvd.add_process_set(sorted(g))
                               for g, s in zip(groups, found, strict=True)])
    except ValueError as exc:
        return CrossSets(sets=None, why=f"hvd.add_process_set refused a cross set ({exc})")


def _say_once(state: DGCState, why: str) -> None:
    """Log on rank 0, once per process and reason, why the share messages go in one stage."""
    if state.rank == 0 and why not in _SAID:
        _SAID.add(why)
        log.warning("DGC hierarchy='node' under Horovod: the share messages go in one all-gather over all "
                    "processes, not in two stages (across the nodes, then inside): %s", why)


@dataclass(kw_only=True)
class HorovodNodeTopology(NodeTopology):
    """:class:`~dgc.hierarchy.NodeTopology` whose node is a Horovod process set (``intra``) and whose
    cross group (``cross``, stage A) is the process set of this local rank on every node."""

    process_set: Any
    """The DGC process set: the ranks of :attr:`nodes` are ranks in it; the one-stage all-gather and the
    dense sum run over it."""

    @classmethod
    def build(cls, state: DGCState, process_set: Any) -> HorovodNodeTopology:
        """The topology of ``state.node_groups`` (already resolved by :func:`node_groups_of`), with one
        process set per node, then one per local rank across the nodes (found, or added in that order
        on every rank).  Two stages with several nodes of several processes where the cross sets are
        registered or can be added; else one all-gather over ``process_set`` (with one process per node
        that is stage A itself; with one node, the gather inside it)."""
        nodes = check_node_groups(state.node_groups, state.world_size)
        members = _members(process_set)
        sets = [node_process_set([members[r] for r in g]) for g in nodes]
        node, local = cls.place_of(nodes, state.rank)
        made = cls(nodes=nodes, node=node, local_rank=local, intra=sets[node], process_set=process_set)
        if made.n_nodes > 1 and made.local_size > 1:
            cross = cross_process_sets([[members[r] for r in made.cross_members(j)]
                                        for j in range(made.local_size)])
            if cross.sets is None:
                _say_once(state, cross.why)
            else:
                made.cross, made.two_stage = cross.sets[local], True
        return made

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
        """Step 3 in one stage (no cross sets): every rank's share message, padded to ``width`` bytes,
        gathered over the DGC set (rows by rank)."""
        if self.n_nodes > 1:
            self.sent_across += (state.world_size - 1) * width
        return hvd.allgather_async(self.padded(state, send, width), name=name, process_set=self.process_set)

    def launch_across(self, state: DGCState, send: Send, width: int, name: str) -> int:
        """Stage A: this rank's share message, padded to ``width`` bytes, all-gathered with the same local
        rank of the other nodes (:attr:`cross`; ``n_nodes`` messages arrive, in the cross set's rank
        order).  Returns the handle."""
        self.sent_across += (self.n_nodes - 1) * width
        return hvd.allgather_async(self.padded(state, send, width), name=name, process_set=self.cross)

    def launch_inside(self, state: DGCState, across: Tensor, name: str) -> int:
        """Stage B: stage A's ``n_nodes`` messages (``across``, arrived) all-gathered inside the node, so
        that every rank holds all N, rank r's in row :attr:`stage_rows` ``[r]``.  Returns the handle."""
        state.record_received(across.numel())  # stage A's n messages (the codec counted stage B's N)
        return hvd.allgather_async(across, name=name, process_set=self.intra)

    def launch_dense(self, send: Send, name: str) -> int:
        """A dense bucket: the zero-padded payloads summed over every process, divided by the nodes."""
        return hvd.allreduce_async_(send.payload.div_(self.n_nodes), name=name, op=hvd.Sum,
                                    process_set=self.process_set)
