"""Errors DGC raises where ``except`` clauses need a name to catch."""

from __future__ import annotations

__all__ = ["NonFiniteGradientError"]


class NonFiniteGradientError(FloatingPointError):
    """A worker's local gradient held NaN/Inf: the step was not applied, nothing was lost.

    Raised by ``backward()`` (DDP hook) and by ``synchronize()``/``step()`` (Horovod) on every rank with
    ``DGCConfig(nonfinite="raise")``; ``except FloatingPointError`` catches it."""
