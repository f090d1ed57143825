"""A simulated multi-node cluster on one machine: network namespaces joined by rate-limited links.

Each "node" is a Linux network namespace with one interface ``eth0`` plugged into a bridge that
lives in a namespace of its own; every link is shaped in both directions with ``tc`` (rate:
``tbf``; delay: ``netem``). The same command runs in every node (``ip netns exec``) with
placeholders filled per node, as a real cluster's launcher would run it on each machine::

    sudo python launch/simcluster.py --nodes 2 --bandwidth 1gbit --delay 0.2ms -- \\
        torchrun --nnodes {nnodes} --node_rank {node_rank} --nproc_per_node 1 \\
        --master_addr {master_addr} --master_port {master_port} script.py

Modules: :mod:`.config` (what to build), :mod:`.cluster` (:class:`SimCluster`, a context
manager), :mod:`.shaping` (the ``tc`` commands), :mod:`.namespaces` (``ip netns`` helpers and
:func:`cleanup_stale`), :mod:`.capabilities` (:func:`check_environment`), :mod:`.probe` (the link
probe, ``python -m dgc.bench.simcluster.probe``), :mod:`.runner` (a command on every node),
:mod:`.signals`, :mod:`.cli`. See docs/simcluster.md.
"""

from .capabilities import check_environment, netem_available
from .cli import main
from .cluster import SimCluster
from .config import PLACEHOLDERS, SimClusterConfig, node_addr, substitute_placeholders
from .errors import Interrupted, SimClusterError
from .namespaces import cleanup_stale, list_namespaces, pid_alive
from .rates import format_rate, parse_rate, parse_time
from .results import ClusterResult, LinkMeasurement, NodeResult

__all__ = [
    "PLACEHOLDERS",
    "ClusterResult",
    "Interrupted",
    "LinkMeasurement",
    "NodeResult",
    "SimCluster",
    "SimClusterConfig",
    "SimClusterError",
    "check_environment",
    "cleanup_stale",
    "format_rate",
    "list_namespaces",
    "main",
    "netem_available",
    "node_addr",
    "parse_rate",
    "parse_time",
    "pid_alive",
    "substitute_placeholders",
]
