"""What a cluster run and a link probe report."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ClusterResult", "LinkMeasurement", "NodeResult"]


@dataclass(kw_only=True, slots=True)
class LinkMeasurement:
    """What a probe from one node to another measured."""

    src: int
    dst: int
    throughput_bit_s: float
    """Payload bytes received per second by ``dst`` (TCP goodput, so a few % under the rate)."""
    rtt_s: float
    """Median round-trip time of a 1-byte TCP ping-pong (includes Python overhead, ~50 us)."""
    seconds: float
    """How long the stream ran."""


@dataclass(kw_only=True, slots=True)
class NodeResult:
    """Outcome of the command on one node."""

    rank: int
    returncode: int
    """Exit status; negative = killed by that signal (as in ``subprocess``)."""
    output: str
    """stdout and stderr, interleaved as the node wrote them."""
    killed: bool = False
    """True if simcluster stopped it (timeout, another node failed, interrupt)."""


@dataclass(kw_only=True, slots=True)
class ClusterResult:
    """Outcome of :meth:`SimCluster.run`."""

    nodes: list[NodeResult] = field(default_factory=list)
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(n.returncode == 0 for n in self.nodes)

    @property
    def exit_code(self) -> int:
        """Shell-style code: 0, 124 on timeout, else the first failing node's (128+sig)."""
        if self.timed_out:
            return 124
        for n in sorted(self.nodes, key=lambda n: (n.killed, n.rank)):
            if n.returncode != 0:
                return n.returncode if n.returncode > 0 else 128 - n.returncode
        return 0
