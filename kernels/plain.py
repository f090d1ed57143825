"""DGC's steps 0-5 for one tensor, plain and unfused: the algorithm as the paper writes it, and the oracle
the fused implementations are tested against.

Lin et al., "Deep Gradient Compression", ICLR 2018, Algorithm 1 with momentum correction, local gradient
clipping and momentum factor masking (the fourth technique, warm-up, only chooses ``k`` per step; see
docs/algorithm.md#invariant for the invariant and
docs/algorithm.md#weight-decay for step 0).  No chunking, no threads, no block
maxima, no sampled threshold: whole-tensor torch operations in the order of the algorithm.

The fused twins (:func:`dgc.kernels.reference.compress_step`, the compiled CPU path of
:mod:`dgc.kernels.cpu_fused`, the CuPy kernels) must give the same selected set and the same bits of u and
v: every step below is written with the torch operation the twins use (``torch.add(g, u, alpha=beta)``
rounds like their fused loop on every machine, where ``beta * u + g`` in two operations might not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PlainStep", "dgc_step_reference", "topk_reference"]


@dataclass(frozen=True)
class PlainStep:
    """What one worker sends for one tensor: ``k`` pairs."""

    indices: Tensor
    """int64 positions in the flattened tensor, ascending."""
    values: Tensor
    """The residual's values at ``indices`` before step 5, in the wire dtype (saturated)."""


def topk_reference(x: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """Positions (ascending) of the ``k`` largest ``|x|``: a stable sort, so ties at the k-th magnitude go
    to the lowest positions (and NaN, which sorts above inf, first).  Masked entries (False) never win."""
    score = x.abs().float()
    if mask is not None:
        score[~mask] = -1.0
    order = torch.sort(score, descending=True, stable=True).indices
    return order[:k].sort().values


def dgc_step_reference(
    grad: Tensor,
    momentum: Tensor | None,
    residual: Tensor,
    *,
    k: int,
    beta: float,
    nesterov: bool = False,
    momentum_masking: bool = True,
    wire_dtype: torch.dtype = torch.float32,
    mask: Tensor | None = None,
    param: Tensor | None = None,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    world_size: int = 1,
) -> PlainStep:
    """One DGC step for one worker and one tensor; ``momentum`` u and ``residual`` v (float32, flat) are
    updated in place.  ``grad`` is not modified."""
    u, v = momentum, residual
    g = grad.detach().reshape(-1)
    # Step 0: weight decay, then local clipping to clip_norm / sqrt(N) (paper, sec. 3.3), in grad's dtype
    if weight_decay:
        g = torch.add(g, param.detach().reshape(-1), alpha=weight_decay)
    if clip_norm is not None:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        g = g * torch.clamp(clip_norm * world_size**-0.5 / (norm + 1e-6), max=1.0).to(g.dtype)
    g = g.float()
    if mask is not None:
        g = g * mask  # pruned coordinates take no gradient, so their u and v stay 0
    # Step 1: momentum correction, u <- beta*u + g (Nesterov: u <- beta*(u + g), and v gets u + g)
    if u is not None:
        u.copy_((u + g) * beta if nesterov else torch.add(g, u, alpha=beta))
    # Step 2: local accumulation, v <- v + u
    v.copy_(v + g if u is None else (v + u + g if nesterov else v + u))
    # Step 3: the k entries of largest |v| (exact top-k, never a masked one)
    sel = topk_reference(v, k, mask)
    # Step 4: pack (index, value) pairs; a half wire saturates values beyond its finite range
    sent = v[sel]
    half = wire_dtype != torch.float32
    values = (sent.clamp(-torch.finfo(wire_dtype).max, torch.finfo(wire_dtype).max) if half else sent)
    values = values.to(wire_dtype, copy=True)
    # Step 5: the residual keeps what the wire did not carry (nothing, in float32); momentum masking
    v[sel] = sent - values.float() if half else 0.0
    if u is not None and momentum_masking:
        u[sel] = 0.0
    return PlainStep(indices=sel, values=values)
