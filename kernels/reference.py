"""Pure-torch twins of the CUDA kernels: the CPU path, and the reference the kernels are tested against.

Every function here has a CuPy counterpart in :mod:`dgc.kernels.cupy_backend` with the same signature and
the same semantics (see ``kernels/*.cu``).  The selection is *exact*: whatever threshold the sample gives,
the result is the set of the ``k`` entries of largest magnitude (ties broken arbitrarily), because the
threshold is only ever used to find a candidate set that provably contains that set.

How the selection is fast on a CPU
----------------------------------
A straightforward ``(x.abs() >= thr).nonzero()`` costs about 2x ``x.clone()`` on a 25M-element tensor,
mostly in ``nonzero`` over 25M booleans.  Instead we work in cache-sized chunks and keep one number per
block of :data:`BLOCK` elements, the block's largest magnitude (``block_max``).  Every entry with
``|x| >= thr`` lies in a block whose maximum is ``>= thr``, so the candidates are found by a ``nonzero``
over ``numel / BLOCK`` block maxima and a gather of those few blocks.  The same block maxima give an exact
threshold for free: the k-th largest block maximum ``T`` has at least ``k`` entries with ``|x| >= T``
(one in each of the top-k blocks), so ``T`` is a valid threshold that needs no retry.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "CHUNK",
    "block_absmax",
    "candidates_above",
    "compress_step",
    "exact_threshold",
    "sampled_threshold",
    "scatter_unpack",
    "select_topk",
]

BLOCK = 64
"""Elements per block of the block-maximum summary (a multiple of the CUDA warp size)."""

CHUNK = 1 << 20
"""Elements per chunk of the fused CPU passes: a 4 MiB float32 slice stays in the L2/L3 cache."""

# Threshold adaptation (SPEC 2.4, as the official DGC code): lower by this factor when too few entries pass.
THRESHOLD_DECAY = 0.8
MAX_THRESHOLD_RETRIES = 10
# Sampled thresholds aim this much above k so that one pass usually suffices.
SAMPLE_OVERSHOOT = 1.1


def _num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def _absmax_into(x: Tensor, out: Tensor, scratch: Tensor, mask: Tensor | None) -> None:
    """Block maxima of ``|x|`` (masked entries count as -1) for a chunk whose length is any size."""
    n = x.numel()
    a = torch.abs(x, out=scratch[:n])
    if mask is not None:
        a.masked_fill_(~mask, -1.0)
    full = n // BLOCK
    if full:
        torch.amax(a[: full * BLOCK].view(full, BLOCK), dim=1, out=out[:full])
    if n % BLOCK:
        out[full] = a[full * BLOCK :].max()


def block_absmax(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Largest ``|x|`` of every block of :data:`BLOCK` consecutive entries (the last block may be short).

    Masked-out entries (``mask`` False) score -1, so they are never candidates.  Returns float32 of
    ``ceil(numel / BLOCK)`` entries.
    """
    x = x.reshape(-1)
    n = x.numel()
    out = torch.empty(_num_blocks(n), dtype=torch.float32, device=x.device)
    scratch = torch.empty(min(n, CHUNK), dtype=torch.float32, device=x.device)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        m = None if mask is None else mask.reshape(-1)[start:stop]
        _absmax_into(x[start:stop], out[start // BLOCK : _num_blocks(stop)], scratch, m)
    return out


def exact_threshold(block_max: Tensor, k: int) -> float:
    """The k-th largest block maximum: at least ``k`` entries reach it (one per top-k block).

    With more than one pick per block (``k`` > number of blocks) no block bound holds: 0 (everything).
    """
    if k > block_max.numel():
        return 0.0
    return max(0.0, float(torch.topk(block_max, k, sorted=False).values.min()))


def sampled_threshold(x: Tensor, k: int, sample_ratio: float, offset: int) -> float:
    """Threshold estimated from a strided sample of ``|x|`` (SPEC 2.4, official DGC defaults).

    The sample takes every ``stride = round(1/sample_ratio)``-th entry from ``offset % stride``, and the
    threshold is the magnitude that keeps ``ceil(k * 1.1 * samples / numel)`` of the sampled entries.
    Returns 0 (no estimate) when the sample is empty.
    """
    x = x.reshape(-1)
    n = x.numel()
    stride = max(1, round(1.0 / sample_ratio))
    sample = x[offset % stride :: stride].abs()
    if sample.numel() == 0:  # tensor shorter than the offset: no estimate, the caller goes exact
        return 0.0
    ks = min(sample.numel(), max(1, math.ceil(k * SAMPLE_OVERSHOOT * sample.numel() / n)))
    return float(torch.topk(sample.float(), ks, sorted=False).values.min())


def candidates_above(x: Tensor, block_max: Tensor, thr: float) -> Tensor:
    """Indices (int64, ascending) of all entries with ``|x| >= thr`` (masked entries excluded).

    Only blocks whose maximum reaches ``thr`` are read.
    """
    x = x.reshape(-1)
    n = x.numel()
    blocks = torch.nonzero(block_max >= thr).squeeze(1)
    if blocks.numel() == 0:
        return blocks
    # Gather the candidate blocks as [nb, BLOCK] index grid; the grid of the short last block is clipped.
    grid = (blocks * BLOCK).unsqueeze(1) + torch.arange(BLOCK, device=x.device)
    grid = grid.reshape(-1)
    if n % BLOCK and blocks[-1] == block_max.numel() - 1:
        grid = grid[grid < n]
    vals = x.index_select(0, grid).abs()
    return grid[vals >= thr]


def _finish(x: Tensor, k: int, cand: Tensor, mask: Tensor | None) -> Tensor:
    """The k candidates of largest |x|, or all of them when exactly k; indices int64 ascending."""
    if mask is not None and cand.numel():
        cand = cand[mask.reshape(-1).index_select(0, cand)]
    if cand.numel() == k:
        return cand
    vals = x.reshape(-1).index_select(0, cand).abs()
    top = torch.topk(vals, k, sorted=False).indices
    return torch.sort(cand.index_select(0, top)).values


def select_topk(
    x: Tensor,
    k: int,
    *,
    sample_ratio: float = 0.01,
    offset: int = 0,
    block_max: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Indices (int64, ascending) of the ``k`` entries of largest ``|x|``; masked entries never chosen.

    ``sample_ratio == 1`` takes the exact block-maximum threshold; below 1 a sampled threshold is tried
    first and lowered by :data:`THRESHOLD_DECAY` (at most :data:`MAX_THRESHOLD_RETRIES` times) while fewer
    than ``k`` entries pass, as in SPEC 2.4; the block threshold is the fallback.  Either way the result is
    the exact top-k set.  ``k`` must not exceed the number of unmasked entries.
    """
    x = x.reshape(-1)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    if block_max is None:
        block_max = block_absmax(x, mask)
    if sample_ratio < 1.0 and mask is None:
        thr = sampled_threshold(x, k, sample_ratio, offset)
        for _ in range(MAX_THRESHOLD_RETRIES):
            if thr <= 0.0:
                break
            cand = candidates_above(x, block_max, thr)
            if cand.numel() >= k:
                return _finish(x, k, cand, None)
            thr *= THRESHOLD_DECAY
    thr = exact_threshold(block_max, k)
    return _finish(x, k, candidates_above(x, block_max, thr), mask)


def compress_step(
    grad: Tensor,
    momentum: Tensor | None,
    residual: Tensor,
    *,
    beta: float,
    nesterov: bool,
    k: int,
    sample_ratio: float,
    offset: int,
    momentum_masking: bool,
    out_indices: Tensor,
    out_values: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """One DGC step for one tensor, fused into a single chunked pass plus the selection.

    ``grad`` (any float dtype, flat), ``momentum`` u and ``residual`` v (float32, flat, updated in place):

    1. momentum correction ``u <- beta*u + g`` (Nesterov: ``u <- beta*(u + g)``, and v gets ``u + g``);
    2. local accumulation ``v <- v + u``;
    3. selection of the ``k`` entries of largest ``|v|`` (masked entries never);
    4. packing: ``out_indices`` (int32) and ``out_values`` (wire dtype) receive the pairs;
    5. momentum factor masking: ``u[sel] <- 0``; ``v[sel] <- v[sel] - sent`` (zero in float32; the wire
       dtype's rounding error otherwise, so nothing is lost).

    With ``mask`` the gradient is multiplied by it first, so masked u and v stay zero.  ``momentum`` may be
    None when ``beta == 0``.  Returns the selected indices (int64) for callers that need them.
    """
    n = grad.numel()
    g = grad.reshape(-1)
    v = residual.reshape(-1)
    u = None if momentum is None else momentum.reshape(-1)
    fm = None if mask is None else mask.reshape(-1)
    block_max = torch.empty(_num_blocks(n), dtype=torch.float32, device=v.device)
    scratch = torch.empty(min(n, CHUNK), dtype=torch.float32, device=v.device)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        gc, vc = g[start:stop], v[start:stop]
        mc = None if fm is None else fm[start:stop]
        if mc is not None:
            gc = gc * mc
        if u is None:
            vc.add_(gc)
        else:
            uc = u[start:stop]
            if nesterov:
                uc.add_(gc).mul_(beta)
                vc.add_(uc).add_(gc)
            else:
                torch.add(gc, uc, alpha=beta, out=uc)
                vc.add_(uc)
        _absmax_into(vc, block_max[start // BLOCK : _num_blocks(stop)], scratch, mc)
    idx = select_topk(v, k, sample_ratio=sample_ratio, offset=offset, block_max=block_max, mask=fm)
    sent = v.index_select(0, idx)
    out_indices.copy_(idx)
    out_values.copy_(sent)
    if out_values.dtype == torch.float32:
        v.index_fill_(0, idx, 0.0)
    else:
        v.index_copy_(0, idx, sent - out_values.float())
    if u is not None and momentum_masking:
        u.index_fill_(0, idx, 0.0)
    return idx


def scatter_unpack(out: Tensor, indices: Tensor, values: Tensor, world_size: int) -> Tensor:
    """Sum ``world_size`` workers' ``(index, value)`` pairs into the dense ``out`` and divide by N.

    ``out`` is overwritten.  ``indices``/``values`` hold ``world_size`` equal-length segments, one per
    worker; within a segment indices are unique, so adding segment by segment in rank order gives the same
    bits on every rank and every device.  A half-precision ``out`` is accumulated in float32.
    """
    flat = out.reshape(-1)
    acc = flat if flat.dtype == torch.float32 else torch.empty_like(flat, dtype=torch.float32)
    acc.zero_()
    idx = indices.reshape(world_size, -1)
    val = values.reshape(world_size, -1)
    for r in range(world_size):
        acc.index_add_(0, idx[r].long(), val[r].float())
    acc.div_(world_size)
    if acc is not flat:
        flat.copy_(acc)
    return out
