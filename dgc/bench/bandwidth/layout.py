"""Which ranks share a node: from the cluster's layout, and checked against torchrun's environment.

``DGCConfig(hierarchy="node")`` finds its nodes in torchrun's ``LOCAL_WORLD_SIZE`` (consecutive ranks
per node; the training loop's :class:`~dgc.training.dgc_communication.DGCCommunication` passes no
``node_groups``).  On the simulated cluster every node runs ``torchrun --nnodes N --node_rank i
--nproc_per_node P``, which sets ``LOCAL_WORLD_SIZE=P`` and numbers the ranks node by node
(:func:`cluster_node_groups`).  The worker checks that this is where the processes really are: every
rank's host name (each simulated node has its own, ``node<i>``) is gathered, the ranks grouped by it
(:func:`groups_from_hosts`), and a layout that differs from ``LOCAL_WORLD_SIZE``'s is an error, so a
hierarchy run never averages "inside a node" across the slow link.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["NodeLayout", "cluster_node_groups", "env_node_groups", "groups_from_hosts"]


def cluster_node_groups(nodes: int, procs_per_node: int) -> list[list[int]]:
    """The ranks of each node when every node runs ``torchrun --nproc_per_node procs_per_node``
    (static rendezvous, ``--node_rank i``): node ``i`` holds ranks ``i P .. i P + P - 1``."""
    if nodes < 1 or procs_per_node < 1:
        raise ValueError(f"nodes={nodes}, procs_per_node={procs_per_node}: both must be >= 1")
    return [list(range(i * procs_per_node, (i + 1) * procs_per_node)) for i in range(nodes)]


def env_node_groups(world_size: int, local_world_size: int) -> list[list[int]]:
    """The nodes ``DGCConfig(hierarchy="node")`` takes from ``LOCAL_WORLD_SIZE`` (consecutive ranks)."""
    if local_world_size < 1 or world_size % local_world_size:
        raise ValueError(f"LOCAL_WORLD_SIZE={local_world_size} does not divide the world size "
                         f"{world_size}: launch the same number of processes on every node")
    return cluster_node_groups(world_size // local_world_size, local_world_size)


def groups_from_hosts(hosts: Sequence[str]) -> list[list[int]]:
    """Ranks grouped by host name (``hosts[r]`` is rank r's), nodes in order of their first rank."""
    groups: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        groups.setdefault(host, []).append(rank)
    return list(groups.values())


@dataclass(kw_only=True, slots=True, frozen=True)
class NodeLayout:
    """The nodes of the running job."""

    groups: list[list[int]]
    """Ranks of the default group on each node."""

    @property
    def nodes(self) -> int:
        return len(self.groups)

    @property
    def procs_per_node(self) -> int:
        return len(self.groups[0])

    @classmethod
    def check(cls, hosts: Sequence[str], local_world_size: int | None) -> NodeLayout:
        """The layout of ranks on ``hosts``; a ValueError if torchrun's ``LOCAL_WORLD_SIZE`` would make
        ``hierarchy="node"`` see other nodes than the hosts."""
        groups = groups_from_hosts(hosts)
        if local_world_size is not None and env_node_groups(len(hosts), local_world_size) != groups:
            raise ValueError(
                f"the ranks run on hosts {groups} (by host name) but LOCAL_WORLD_SIZE="
                f"{local_world_size} makes DGCConfig(hierarchy='node') group them as "
                f"{env_node_groups(len(hosts), local_world_size)}: launch torchrun with --node_rank "
                "and the same --nproc_per_node on every node, or pass DGCState(node_groups=...)"
            )
        return cls(groups=groups)

    @classmethod
    def of_run(cls) -> NodeLayout:
        """Gather every rank's host name over the default group and :meth:`check` it (every rank
        calls it)."""
        hosts: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
        local = os.environ.get("LOCAL_WORLD_SIZE")
        return cls.check([str(h) for h in hosts], None if local is None else int(local))
