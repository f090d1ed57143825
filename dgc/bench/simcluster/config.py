"""What cluster to build: :class:`SimClusterConfig`, node addresses and placeholders."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_NODES",
    "NODE_IFNAME",
    "PLACEHOLDERS",
    "PROBE_PORT",
    "SUBNET_PREFIX",
    "SimClusterConfig",
    "node_addr",
    "substitute_placeholders",
]

#: First three octets of every node address; node ``i`` is ``198.18.0.<i+1>``.
SUBNET_PREFIX = "198.18.0."
#: Most nodes a cluster can have (addresses .1 to .250 of one /24).
MAX_NODES = 250
#: Name of each node's interface inside its namespace (also exported as GLOO_SOCKET_IFNAME etc.).
NODE_IFNAME = "eth0"
#: Placeholders that :func:`substitute_placeholders` fills; any other ``{...}`` is left as it is.
PLACEHOLDERS = ("node_rank", "nnodes", "master_addr", "master_port", "node_addr")

#: Default TCP port of the link probe.
PROBE_PORT = 5201

_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")


def node_addr(rank: int) -> str:
    """IPv4 address of node ``rank`` (198.18.0.<rank+1>)."""
    return f"{SUBNET_PREFIX}{rank + 1}"


def substitute_placeholders(argv: Sequence[str], values: dict[str, object]) -> list[str]:
    """Replace ``{name}`` for each name in ``values`` inside every argument of ``argv``.

    Only the given names are touched: other braces (JSON, shell ``${VAR}``, Python f-strings in a
    ``-c`` script) pass through unchanged, which ``str.format`` would not allow.
    """
    pattern = re.compile(r"\{(" + "|".join(re.escape(k) for k in values) + r")\}")
    return [pattern.sub(lambda m: str(values[m.group(1)]), arg) for arg in argv]


@dataclass(kw_only=True, slots=True)
class SimClusterConfig:
    """What cluster to build. Every field is checked in ``__post_init__``."""

    nodes: int = 2
    """Number of nodes (network namespaces), 1 to 250. Node 0 hosts the rendezvous."""
    bandwidth_bit_s: float | None = 1e9
    """Rate of every node's link in bit/s, applied to what a node sends and to what it
    receives. ``None`` = unlimited (no ``tbf``; the veth pair then runs as fast as the CPU)."""
    delay_s: float = 0.0
    """One-way delay in seconds between any two nodes (round trip = 2x); 0 = off (no
    ``netem``). Needs the kernel's ``sch_netem``."""
    allow_no_delay: bool = False
    """If ``delay_s > 0`` and the kernel has no ``netem``: False = refuse to start,
    True = warn and run without delay."""
    queue_s: float = 0.010
    """Queue of each rate limiter, in seconds at the link rate (``tbf latency``); packets beyond
    it are dropped, like a switch buffer."""
    master_port: int = 29500
    """Port filled into ``{master_port}`` (and ``MASTER_PORT``); the rendezvous runs on node 0."""
    prefix: str = "dgcsim"
    """Start of every namespace name: ``<prefix><pid>s<seq>n<rank>`` and ``...br`` for the
    bridge. ``--cleanup-stale`` removes names with this prefix whose pid is dead."""

    def __post_init__(self) -> None:
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int):
            raise TypeError(f"nodes must be an int, got {type(self.nodes).__name__}")
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"nodes={self.nodes} must be between 1 and {MAX_NODES}")
        if self.bandwidth_bit_s is not None and not (
            self.bandwidth_bit_s >= 1e3 and math.isfinite(self.bandwidth_bit_s)
        ):
            raise ValueError(
                f"bandwidth_bit_s={self.bandwidth_bit_s} must be >= 1000 bit/s and finite; "
                "use None for an unlimited link"
            )
        if not (self.delay_s >= 0 and math.isfinite(self.delay_s)):
            raise ValueError(f"delay_s={self.delay_s} must be >= 0 seconds (0 = no delay)")
        if not self.queue_s > 0:
            raise ValueError(f"queue_s={self.queue_s} must be > 0 seconds")
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port={self.master_port} must be a TCP port (1-65535)")
        if not _NAME_RE.match(self.prefix):
            raise ValueError(
                f"prefix={self.prefix!r} must be 1-16 lowercase letters/digits starting with a "
                "letter (it starts namespace names)"
            )

    @property
    def master_addr(self) -> str:
        """Address of node 0, where the rendezvous runs."""
        return node_addr(0)
