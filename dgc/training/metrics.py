"""Running sums the loop keeps: gradient traffic per step, and loss/accuracy per epoch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from dgc.stats import CompressionStats

__all__ = ["Traffic", "TaskMeter"]


@dataclass(kw_only=True, slots=True)
class Traffic:
    """Gradient traffic of one worker summed over ``steps`` communication steps.

    Bytes are payloads handed to the collectives (see :class:`dgc.CompressionStats`).
    """

    steps: int = 0
    bytes_sent: int = 0
    """Bytes this worker contributed."""
    bytes_received: int = 0
    """Bytes this worker received (an allgather returns N messages)."""
    dense_bytes: int = 0
    """Bytes plain DDP would have allreduced: the gradients themselves."""
    elements: int = 0
    elements_sent: int = 0

    def add(self, stats: CompressionStats) -> None:
        self.steps += 1
        self.bytes_sent += stats.bytes_sent
        self.bytes_received += stats.bytes_received
        self.dense_bytes += stats.dense_bytes
        self.elements += stats.elements
        self.elements_sent += stats.elements_sent

    @property
    def bytes_sent_per_step(self) -> float:
        return self.bytes_sent / self.steps if self.steps else 0.0

    @property
    def bytes_received_per_step(self) -> float:
        return self.bytes_received / self.steps if self.steps else 0.0

    @property
    def dense_bytes_per_step(self) -> float:
        return self.dense_bytes / self.steps if self.steps else 0.0

    @property
    def compression_ratio(self) -> float:
        """Dense gradient bytes over bytes sent (1 = no compression)."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else 0.0

    @property
    def achieved_density(self) -> float:
        """Fraction of the gradient elements sent."""
        return self.elements_sent / self.elements if self.elements else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "bytes_sent_per_step": self.bytes_sent_per_step,
            "bytes_received_per_step": self.bytes_received_per_step,
            "dense_bytes_per_step": self.dense_bytes_per_step,
            "compression_ratio": self.compression_ratio,
            "achieved_density": self.achieved_density,
        }

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, int]) -> Traffic:
        return cls(**{k: int(v) for k, v in state.items()})


@dataclass(kw_only=True, slots=True)
class TaskMeter:
    """Summed loss and correct predictions over ``count`` targets (one rank's share)."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, loss_sum: float, correct: int, count: int) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.count += count

    def result(self, language_model: bool) -> dict[str, float]:
        """``loss`` (mean per target), ``accuracy`` in %, and ``perplexity`` for a language model."""
        loss = self.loss_sum / self.count if self.count else math.nan
        out = {"loss": loss, "accuracy": 100.0 * self.correct / self.count if self.count else math.nan}
        if language_model:
            out["perplexity"] = math.exp(min(loss, 700.0))
        return out

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TaskMeter:
        return cls(loss_sum=float(state["loss_sum"]), correct=int(state["correct"]),
                   count=int(state["count"]))
