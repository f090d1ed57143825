"""Per-step compression statistics (what PowerSGD's ``_report_compression_stats`` logs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["CompressionStats"]


@dataclass(kw_only=True, slots=True)
class CompressionStats:
    """Traffic of one worker in one communication step, summed over its buckets.

    Byte counts are payload sizes (what the collective is handed and returns), not the traffic of a
    particular collective algorithm: a ring allreduce moves about twice ``bytes_sent`` over the wire.
    """

    step: int = -1
    """The communication step these figures belong to (-1 before the first step)."""
    bytes_sent: int = 0
    """Bytes this worker contributed: the message for an allgather, the buffer for an allreduce."""
    bytes_received: int = 0
    """Bytes this worker received: N messages for an allgather (``hierarchy="node"`` in two stages: n
    share messages from its peers in the other nodes, then the node's N), the buffer for an allreduce."""
    dense_bytes: int = 0
    """Bytes of the gradients themselves (what plain DDP would allreduce)."""
    elements: int = 0
    """Gradient elements handled."""
    elements_sent: int = 0
    """Elements sent (k per compressed tensor, all of a dense one)."""
    density: float = 1.0
    """Target density of this step (1 during dense steps)."""
    dense_buckets: int = 0
    """Buckets that went through plain allreduce."""
    sparse_buckets: int = 0
    """Buckets that went through the sparse allgather."""

    @property
    def achieved_density(self) -> float:
        """Fraction of the gradient elements sent."""
        return self.elements_sent / self.elements if self.elements else 0.0

    @property
    def compression_ratio(self) -> float:
        """Dense bytes over bytes sent."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else 0.0

    def add(self, *, sent: int, received: int, dense: int, elements: int, elements_sent: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.dense_bytes += dense
        self.elements += elements
        self.elements_sent += elements_sent

    def to_dict(self) -> dict[str, float | int]:
        d = asdict(self)
        d["achieved_density"] = self.achieved_density
        d["compression_ratio"] = self.compression_ratio
        return d
