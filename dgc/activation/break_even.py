"""Measure where ``SparseInputLinear``'s sparse path starts to beat the dense ``nn.Linear``.

Times forward + backward of both paths on ReLU-like random inputs of which a fraction ``s``
of the features is zero across the batch, for increasing ``s``, and reports the sparsity from
which the sparse path is faster.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dgc.activation.sparse_linear import active_features, sparse_input_linear

__all__ = ["BreakEven", "measure_break_even", "sparse_input", "time_fwd_bwd"]


@dataclass(kw_only=True, slots=True)
class BreakEven:
    """Timings per sparsity and the break-even point."""

    sparsities: list[float]
    dense_s: list[float] = field(default_factory=list)
    """Median seconds of dense forward+backward per sparsity."""
    sparse_s: list[float] = field(default_factory=list)
    """Median seconds of the sparse path per sparsity."""
    speedup: list[float] = field(default_factory=list)
    """Median of the per-pair ratios dense / sparse, per sparsity."""
    break_even: float = 1.0
    """Lowest measured sparsity from which the sparse path is faster at every measured
    sparsity (1.0: never)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sparse_input(batch: int, in_features: int, sparsity: float, *, device: Any = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    """ReLU-like random input whose ``round(sparsity * in)`` features are zero batch-wide
    (spread over the features, not a prefix, so gathers are realistic)."""
    g = torch.Generator().manual_seed(seed)
    # Live features are ReLU outputs: also zero on about half of their entries.
    x = torch.randn(batch, in_features, generator=g).relu_()
    dead = torch.randperm(in_features, generator=g)[: round(sparsity * in_features)]
    x[:, dead] = 0
    return x.to(device=device, dtype=dtype)


def _fwd_bwd_seconds(fn: Any, x: Tensor, weight: Tensor, bias: Tensor) -> float:
    for t in (x, weight, bias):
        t.grad = None
    _sync(x.device)
    t0 = time.perf_counter()
    fn(x, weight, bias).backward(torch.ones(x.shape[0], weight.shape[0], device=x.device,
                                            dtype=x.dtype))
    _sync(x.device)
    return time.perf_counter() - t0


def time_fwd_bwd(fn: Any, x: Tensor, weight: Tensor, bias: Tensor, *, repeats: int,
                 warmup: int = 1) -> float:
    """Median seconds of ``fn(x, weight, bias)`` forward + backward."""
    for _ in range(warmup):
        _fwd_bwd_seconds(fn, x, weight, bias)
    return statistics.median(_fwd_bwd_seconds(fn, x, weight, bias) for _ in range(repeats))


def measure_break_even(
    *,
    batch: int,
    in_features: int,
    out_features: int,
    input_grad: str = "full",
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    sparsities: Sequence[float] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
    repeats: int = 3,
    input_requires_grad: bool = True,
) -> BreakEven:
    """Time dense vs sparse forward+backward and return the break-even sparsity.

    Dense and sparse runs alternate, and each sparsity's speed-up is the median of the
    per-pair ratios, so load from other processes hits both sides alike. The break-even is
    the lowest measured sparsity from which the sparse path wins at every higher measured
    sparsity too (one lucky point does not count).
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(
        device=device, dtype=dtype).requires_grad_()
    bias = torch.zeros(out_features, device=device, dtype=dtype, requires_grad=True)
    result = BreakEven(sparsities=list(sparsities))

    def dense(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return F.linear(x, w, b)

    def sparse(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        idx = active_features(x)
        return sparse_input_linear(x, w, b, idx, input_grad=input_grad)  # type: ignore[arg-type]

    for s in sparsities:
        x = sparse_input(batch, in_features, s, device=device, dtype=dtype)
        x.requires_grad_(input_requires_grad)
        _fwd_bwd_seconds(dense, x, weight, bias)  # warm-up
        _fwd_bwd_seconds(sparse, x, weight, bias)
        pairs = [(_fwd_bwd_seconds(dense, x, weight, bias),
                  _fwd_bwd_seconds(sparse, x, weight, bias)) for _ in range(repeats)]
        result.dense_s.append(statistics.median(d for d, _ in pairs))
        result.sparse_s.append(statistics.median(sp for _, sp in pairs))
        result.speedup.append(statistics.median(d / sp for d, sp in pairs))
    result.break_even = 1.0
    for s, speedup in zip(reversed(result.sparsities), reversed(result.speedup), strict=True):
        if speedup <= 1.0:
            break
        result.break_even = s
    return result
