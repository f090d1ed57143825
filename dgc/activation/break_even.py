"""Where ``SparseInputLinear``'s sparse path starts to beat the dense ``nn.Linear``.

Two ways to get the break-even feature sparsity s* (fraction of input features zero across
the batch from which the sparse path is faster, forward + backward):

- ``predicted_break_even`` (the default of ``SparseInputLinear``): a model, no timing. Per
  unit of sparsity the sparse path saves the time of the products that shrink (N*in*out
  multiply-adds each, N = batch rows); it pays memory-bound passes over x (zero check,
  gather, input-gradient zero-fill and scatter: ~N*in elements, so ~1/out of a product), over
  W (column gather, weight-gradient zero-fill and scatter into a fresh out*in buffer: ~1/N of
  a product) and a fixed ~0.1 ms (Python, the autograd Function, ~15 op launches). Fitted to
  the break-evens measured over 48 shapes (batch 16-512, in 128-2048, out 10-2048, 1 and 2
  threads; ``launch/bench_sparse_linear.py --fit``) on this project's 2-core x86 CPU (MKL):

      s* = margin * threads**thread_exponent * (per_out / out + per_in / in
                                                + per_batch / sqrt(N)
                                                + fixed / (N * in * out)) * 3 / P

  The W passes weigh 1/sqrt(N) rather than 1/N and a 1/in term appears because products
  with a small batch or few features run at a lower rate. The fit (of the bare autograd
  Function) needed no fixed term; ``fixed`` is the module's own routing and reshaping
  (~30 us, measured at batch 64, 512x512) in multiply-adds at 2 threads. P = number of products that shrink: the
  forward, the weight gradient if W needs one, the input gradient if x needs one and
  ``input_grad="active"``; the fit is for P = 3, and "full" (P = 2) measured a little below
  3/2 of it. More threads speed up the products more than the passes, so s* grows with them
  (1 -> 2 threads: x1.14-1.37 per term). Above ``never_above`` the answer is 1.0 ("never":
  small layers, few output features, batches below ~64), and it is never below
  ``DEFAULT_MIN_SPARSITY``. Deterministic and free, unlike a measurement at first use (which
  costs seconds for a large layer and moves with the machine's load); the price is that the
  constants are this machine's: elsewhere use ``min_sparsity="auto"`` (measured per shape) or
  an explicit threshold.
- ``measure_break_even`` (``min_sparsity="auto"``): times both paths for this shape.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dgc.activation.sparse_product import active_features, sparse_input_linear

__all__ = [
    "CPU_COST_MODEL",
    "DEFAULT_MIN_SPARSITY",
    "BreakEven",
    "CostModel",
    "measure_break_even",
    "predicted_break_even",
    "sparse_input",
    "time_fwd_bwd",
]

#: Lowest threshold ``predicted_break_even`` returns, per input-gradient mode: a little below
#: the lowest break-even measured (0.18 "active", 0.20 "full", batch 512, 1 thread), so the
#: model does not extrapolate to larger layers than it was fitted on.
DEFAULT_MIN_SPARSITY: dict[str, float] = {"active": 0.15, "full": 0.2}


@dataclass(frozen=True, kw_only=True, slots=True)
class CostModel:
    """Constants of the break-even model (see the module docstring)."""

    per_out: float
    """Weight of the passes over x (N*in elements) against the products (N*in*out)."""
    per_in: float
    """Weight of the lower rate of products over few input features."""
    per_batch: float
    """Weight of the passes over W (out*in elements), divided by sqrt(batch rows)."""
    fixed: float = 3e6
    """Fixed cost per forward+backward, in multiply-adds of the products (~30 us)."""
    thread_exponent: float = 0.4
    """s* grows as threads**this (1 -> 2 threads measured x1.14-1.37 per term)."""
    margin: float = 1.25
    """Safety factor on the fit: the model must not pick a path slower than dense."""
    never_above: float = 0.9
    """A threshold above this means "never sparse": the gain left is small and within the
    model's error."""


#: Fitted on CPU, float32, ``input_grad="active"`` with all gradients, 1 and 2 threads
#: (rounded up). float64 products are slower, so the same thresholds are conservative there.
CPU_COST_MODEL = CostModel(per_out=45.0, per_in=35.0, per_batch=3.0)


@functools.lru_cache(maxsize=1024)
def predicted_break_even(*, batch: int, in_features: int, out_features: int,
                         input_grad: str = "full", device_type: str = "cpu",
                         dtype: torch.dtype = torch.float32, threads: int = 1,
                         input_requires_grad: bool = True,
                         weight_requires_grad: bool = True,
                         model: CostModel = CPU_COST_MODEL) -> float:
    """The model's threshold for this layer and input (1.0 = never sparse).

    Non-CPU devices and dtypes other than float32/float64 get 1.0: on CUDA finding the
    active features is a host sync per forward and cuBLAS makes the dense product cheap;
    half-precision CPU products were not measured. Without any gradient (inference) only
    the forward product shrinks: P = 1, not fitted, so conservative.
    """
    if device_type != "cpu" or dtype not in (torch.float32, torch.float64):
        return 1.0
    if batch <= 0 or in_features <= 0 or out_features <= 0:
        return 1.0
    # Step 1: products that shrink with the sparsity (of the 3 the fit was made with).
    shrinking = 1 + int(weight_requires_grad) + int(input_requires_grad
                                                    and input_grad == "active")
    # Step 2: the fitted overhead-to-savings ratio for this shape and thread count.
    s = (model.per_out / out_features + model.per_in / in_features
         + model.per_batch / math.sqrt(batch)
         + model.fixed / (batch * in_features * out_features))
    s *= max(1, threads) ** model.thread_exponent * 3 / shrinking * model.margin
    # Step 3: clamp to the measured range.
    if s > model.never_above:
        return 1.0
    return max(s, DEFAULT_MIN_SPARSITY.get(input_grad, DEFAULT_MIN_SPARSITY["full"]))


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
    (spread over the features, not a prefix, so gathers are realistic); every other feature
    has a nonzero entry."""
    g = torch.Generator().manual_seed(seed)
    # Live features are ReLU outputs: also zero on about half of their entries.
    x = torch.randn(batch, in_features, generator=g).relu_()
    x[0] = x[0].abs() + x[0].eq(0) * 0.5  # a nonzero entry in every column
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
