"""When to prune and how much: one-shot, and the gradual AGP schedule.

A schedule maps the global optimizer step to a target sparsity. The pruner recomputes the
masks whenever that target changes, so a schedule's *update steps* are the steps where
``sparsity_at`` takes a new value.

Step positions are ints (absolute optimizer steps) or floats in [0, 1] (fractions of the
training run); fractions are turned into steps by ``resolve(total_steps)``, which
``build_pruner`` calls with the loop's total number of steps.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

__all__ = ["AGP", "OneShot", "Schedule", "resolve_step"]


def resolve_step(value: int | float, total_steps: int | None, key: str) -> int:
    """An int step stays; a float in [0, 1] becomes ``round(value * total_steps)``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key} must be an int step or a float fraction, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
        return value
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{key}={value} is a float, read as a fraction of training, so it must lie in "
            "[0, 1]; write an int for an absolute step"
        )
    if total_steps is None:
        raise ValueError(
            f"{key}={value} is a fraction of training; pass total_steps to build_pruner "
            "(or resolve the schedule) or give an int step"
        )
    return round(value * total_steps)


def _check_sparsity(value: float, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
    return float(value)


class Schedule(ABC):
    """Target sparsity as a function of the global optimizer step."""

    @abstractmethod
    def sparsity_at(self, step: int) -> float:
        """Target fraction of pruned weights at optimizer step ``step`` (0-based)."""

    @abstractmethod
    def resolve(self, total_steps: int | None) -> Schedule:
        """A copy with fractional step positions turned into steps."""

    @property
    @abstractmethod
    def final_sparsity(self) -> float:
        """Sparsity once the schedule is over."""


@dataclass(kw_only=True, slots=True)
class OneShot(Schedule):
    """Prune to ``sparsity`` once, at ``at_step``; then keep the masks (fine-tune)."""

    sparsity: float = 0.9
    """Fraction of weights pruned, in [0, 1)."""
    at_step: int | float = 0
    """Step at which the masks are computed (int), or fraction of training (float in [0, 1]);
    0 = before the first step (prune a pretrained model, then fine-tune)."""

    def __post_init__(self) -> None:
        self.sparsity = _check_sparsity(self.sparsity, "prune.schedule.sparsity")
        if isinstance(self.at_step, int) and not isinstance(self.at_step, bool):
            resolve_step(self.at_step, None, "prune.schedule.at_step")

    def resolve(self, total_steps: int | None) -> OneShot:
        return replace(self, at_step=resolve_step(self.at_step, total_steps,
                                                  "prune.schedule.at_step"))

    @property
    def final_sparsity(self) -> float:
        return self.sparsity

    def sparsity_at(self, step: int) -> float:
        at = resolve_step(self.at_step, None, "prune.schedule.at_step")
        return self.sparsity if step >= at else 0.0


@dataclass(kw_only=True, slots=True)
class AGP(Schedule):
    """Automated gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune").

    Every ``frequency`` steps from ``start_step`` (t0) to ``end_step`` (t0 + n*dt) the target
    rises along a cubic that prunes fast early and slowly at the end::

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3

    evaluated at the last update step ``t0 + floor((t - t0) / dt) * dt`` (held in between),
    0 before ``start_step`` and ``s_f`` from ``end_step`` on.
    """

    sparsity: float = 0.9
    """s_f, the final target, reached at ``end_step``, in [0, 1)."""
    initial_sparsity: float = 0.0
    """s_i, the target applied at ``start_step``, in [0, s_f]."""
    start_step: int | float = 0
    """t0: first update step (int), or fraction of training (float in [0, 1])."""
    end_step: int | float = 0.5
    """t0 + n*dt: step where s_f is reached (int), or fraction of training (float in [0, 1]).
    Zhu & Gupta end pruning well before the end so the network recovers at s_f."""
    frequency: int = 100
    """dt: optimizer steps between mask updates (>= 1)."""

    def __post_init__(self) -> None:
        self.sparsity = _check_sparsity(self.sparsity, "prune.schedule.sparsity")
        self.initial_sparsity = _check_sparsity(self.initial_sparsity,
                                                "prune.schedule.initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise ValueError(
                f"prune.schedule.initial_sparsity={self.initial_sparsity} exceeds the final "
                f"sparsity {self.sparsity}; AGP only increases sparsity"
            )
        if isinstance(self.frequency, bool) or not isinstance(self.frequency, int) \
                or self.frequency < 1:
            raise ValueError(f"prune.schedule.frequency must be an int >= 1, got "
                             f"{self.frequency!r}")
        if all(isinstance(v, int) for v in (self.start_step, self.end_step)):
            self._check_steps(self.start_step, self.end_step)

    @staticmethod
    def _check_steps(start: int, end: int) -> None:
        resolve_step(start, None, "prune.schedule.start_step")
        if end <= start:
            raise ValueError(
                f"prune.schedule.end_step ({end}) must be after start_step ({start})"
            )

    def resolve(self, total_steps: int | None) -> AGP:
        start = resolve_step(self.start_step, total_steps, "prune.schedule.start_step")
        end = resolve_step(self.end_step, total_steps, "prune.schedule.end_step")
        self._check_steps(start, end)
        return replace(self, start_step=start, end_step=end)

    @property
    def final_sparsity(self) -> float:
        return self.sparsity

    def sparsity_at(self, step: int) -> float:
        t0 = resolve_step(self.start_step, None, "prune.schedule.start_step")
        end = resolve_step(self.end_step, None, "prune.schedule.end_step")
        if step < t0:
            return 0.0
        if step >= end:
            return self.sparsity
        t = t0 + math.floor((step - t0) / self.frequency) * self.frequency
        progress = (t - t0) / (end - t0)
        s_i, s_f = self.initial_sparsity, self.sparsity
        return s_f + (s_i - s_f) * (1.0 - progress) ** 3
