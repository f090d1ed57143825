"""Pure-torch twins of the CUDA kernels: the CPU path, and the reference the kernels are tested against.

Every function here has a CuPy counterpart in :mod:`dgc.kernels.cupy_backend` with the same signature and
the same semantics (see ``kernels/*.cu``).  The selection is *exact*: whatever threshold the sample gives,
the result is the set of the ``k`` entries of largest magnitude (ties to the lowest index), because the
threshold is only ever used to find a candidate set that provably contains that set.

How the selection is fast on a CPU
----------------------------------
A straightforward ``(x.abs() >= thr).nonzero()`` costs about 2x ``x.clone()`` on a 25M-element tensor:
a 100 MB temporary (fresh pages from the kernel, every call) and a ``nonzero`` over 25M booleans.
Instead we work in cache-sized chunks (:data:`CHUNK`) with a reused scratch buffer and keep one number
per block of :data:`BLOCK` elements, the block's largest magnitude (``block_max``).  Every entry with
``|x| >= thr`` lies in a block whose maximum is ``>= thr``, so the candidates are found by a ``nonzero``
over ``numel / BLOCK`` block maxima and a gather of those few blocks.  The same block maxima give an exact
threshold for free: the k-th largest block maximum ``T`` has at least ``k`` entries with ``|x| >= T``
(one in each of the top-k blocks), so ``T`` is a valid threshold that needs no retry.
:func:`compress_step` computes the block maxima inside its one chunked pass over the state, while the
chunk is still in cache, so the selection reads no more than the 1% sample and the candidate blocks.

Every operation works on less than ATen's parallel grain (32768 elements), so it runs serially in its
thread; the passes are split among ``torch.get_num_threads()`` threads of a small pool instead, with one
join per pass.  With an OpenMP barrier after every operation, the same passes ran 5-10x slower as soon
as another process competed for the cores.  On CUDA tensors (the twin as a reference on a GPU) each
pass is a single chunk, run in the calling thread.

Comparisons are made between tensors of the block maxima's dtype (float32; float64 for float64 input):
a Python threshold is rounded to the tensor's dtype by torch, so comparing block maxima and entries in
the same dtype keeps "block maximum >= thr" equivalent to "some entry of the block >= thr".
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "Candidates",
    "CHUNK",
    "MAX_THRESHOLD_RETRIES",
    "SAMPLE_OVERSHOOT",
    "THRESHOLD_DECAY",
    "block_absmax",
    "candidates_above",
    "divide_sum",
    "check_k",
    "check_state",
    "compress_step",
    "dense_momentum",
    "dense_momentum_many",
    "exact_threshold",
    "largest",
    "pack",
    "sample_stride",
    "sampled_threshold",
    "saturate",
    "scatter_unpack",
    "select_topk",
    "threshold_of_sample",
]

BLOCK = 64
"""Elements per block of the block-maximum summary (two CUDA warps; ``DGC_BLOCK`` in the .cu sources)."""

CHUNK = 32768 - BLOCK
"""Elements per chunk of the CPU passes (a multiple of :data:`BLOCK`): 128 KiB per float32 operand, so
the chunk of g, u, v and the scratch buffer stays in L2 between the element-wise operations, and just
below ATen's parallel grain (32768 elements), so each operation runs serially in its thread."""

THRESHOLD_DECAY = 0.8
"""Factor applied to the sampled threshold when fewer than k entries pass it (official code; see
docs/algorithm.md#selection)."""

MAX_THRESHOLD_RETRIES = 10
"""How many times the sampled threshold may be lowered before the exact threshold takes over."""

SAMPLE_OVERSHOOT = 1.1
"""Sampled thresholds aim this much above k so that one pass usually suffices."""

_DENSE_SCAN_FRACTION = 2
"""When more than 1/this of the blocks are candidates, scanning everything beats gathering blocks (and
when more than 1/this of the positions were sent, a dense division beats a sparse one)."""

_T = TypeVar("_T")


# ------------------------------------------------------------------------------------------ chunked passes
_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child makes its own
# Exit: concurrent.futures joins the idle workers at interpreter shutdown, before atexit handlers run and
# before torch finalizes process groups, so nothing of this pool outlives them; with one thread (torchrun
# sets OMP_NUM_THREADS=1) the pool is never created.
_POOL_LOCK = threading.Lock()
_POOL_PREFIX = "dgc-twin"


_CPUS = os.cpu_count()  # read once: it is a system call, and the chunk helpers run per step

def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            size = max(1, (_CPUS or 2) - 1)  # the calling thread is the other worker
            pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix=_POOL_PREFIX)
            _POOL = (os.getpid(), pool)
        return _POOL[1]


def _piece(device: torch.device, piece: int = CHUNK) -> int:
    """Step of a chunked loop: ``piece`` on a CPU; on a GPU everything at once (each torch op is then
    one kernel launch over the whole tensor)."""
    return piece if device.type == "cpu" else 1 << 62


def _over_chunks(
    n: int, run: Callable[[int, int], _T], device: torch.device, piece: int = CHUNK
) -> list[_T]:
    """``run(lo, hi)`` over contiguous ranges covering ``[0, n)`` whose bounds are multiples of
    ``piece``, one range per thread of ``torch.get_num_threads()`` on a CPU; results in range order.

    Every range is processed with the same operations whichever thread runs it, so the result does not
    depend on the thread count.
    """
    pieces = (n + piece - 1) // piece
    workers = min(torch.get_num_threads(), _CPUS or 1, pieces // 4)  # >= 4 pieces each
    nested = threading.current_thread().name.startswith(_POOL_PREFIX)  # never wait on our own pool
    if device.type != "cpu" or workers <= 1 or nested:
        return [run(0, n)]
    per = (pieces + workers - 1) // workers * piece
    bounds = [(lo, min(lo + per, n)) for lo in range(0, n, per)]
    futures = [_pool().submit(run, lo, hi) for lo, hi in bounds[1:]]
    try:
        first = run(*bounds[0])
    finally:  # never return (or raise) while a worker still writes
        errors = [f.exception() for f in futures]
    for exc in errors:
        if exc is not None:
            raise exc
    return [first, *(f.result() for f in futures)]


# -------------------------------------------------------------------------------------- block summaries
def _num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def _summary_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of block maxima and magnitude comparisons: float32 holds every float16/bfloat16/float32
    value exactly; float64 input keeps float64 so that no magnitude is rounded."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _abs_into(x: Tensor, out: Tensor) -> Tensor:
    """``|x|`` written into ``out`` (same length, the summary dtype)."""
    if x.dtype == out.dtype:
        return torch.abs(x, out=out)
    return out.copy_(x).abs_()


_MINUS_ONE: dict[torch.dtype, Tensor] = {}


def _absmax_into(x: Tensor, out: Tensor, scratch: Tensor, mask: Tensor | None) -> None:
    """Block maxima of ``|x|`` (masked entries count as -1) for a chunk of any length."""
    n = x.numel()
    a = _abs_into(x, scratch[:n])
    if mask is not None:
        minus_one = _MINUS_ONE.get(a.dtype)
        if minus_one is None:  # torch.where with out= wants a tensor; a CPU scalar suits any device
            minus_one = _MINUS_ONE[a.dtype] = torch.tensor(-1.0, dtype=a.dtype)
        torch.where(mask, a, minus_one, out=a)
    full = n // BLOCK
    if full:
        torch.amax(a[: full * BLOCK].view(full, BLOCK), dim=1, out=out[:full])
    if n % BLOCK:
        out[full] = a[full * BLOCK :].max()


def _summarize(x: Tensor, mask: Tensor | None) -> Tensor:
    """One chunked pass over ``x``: its block maxima."""
    n = x.numel()
    dtype = _summary_dtype(x.dtype)
    out = torch.empty(_num_blocks(n), dtype=dtype, device=x.device)
    step = _piece(x.device)

    def run(lo: int, hi: int) -> None:
        scratch = torch.empty(min(hi - lo, step), dtype=dtype, device=x.device)
        for start in range(lo, hi, step):
            stop = min(start + step, hi)
            m = None if mask is None else mask[start:stop]
            _absmax_into(x[start:stop], out[start // BLOCK : _num_blocks(stop)], scratch, m)

    _over_chunks(n, run, x.device)
    return out


def block_absmax(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Largest ``|x|`` of every block of :data:`BLOCK` consecutive entries (the last block may be short).

    Masked-out entries (``mask`` False) score -1, so they are never candidates.  Returns float32 (float64
    for float64 ``x``) of ``ceil(numel / BLOCK)`` entries.
    """
    return _summarize(x.detach().reshape(-1), None if mask is None else mask.reshape(-1))


# ------------------------------------------------------------------------------------------- thresholds
def exact_threshold(block_max: Tensor, k: int) -> float:
    """The k-th largest block maximum: at least ``k`` entries reach it (one per top-k block).

    With more than one pick per block (``k`` > number of blocks) no block bound holds: 0 (everything).
    """
    if k > block_max.numel():
        return 0.0
    if k <= 0:
        return math.inf
    return max(0.0, float(torch.topk(block_max, k, sorted=False).values.min()))


def sampled_threshold(x: Tensor, k: int, sample_ratio: float, offset: int) -> float:
    """Threshold estimated from a strided sample of ``|x|`` (official DGC defaults; see
    docs/algorithm.md#selection).

    The sample takes every ``stride = round(1/sample_ratio)``-th entry from ``offset % stride``, and the
    threshold is the magnitude that keeps ``ceil(k * 1.1 * samples / numel)`` of the sampled entries.
    Returns 0 (no estimate) when the sample is empty.
    """
    x = x.detach().reshape(-1)
    stride = sample_stride(sample_ratio)
    sample = x[offset % stride :: stride]
    return threshold_of_sample(sample.abs().to(_summary_dtype(x.dtype)), k, x.numel())


def sample_stride(sample_ratio: float) -> int:
    """Distance between sampled entries: ``round(1 / sample_ratio)``, at least 1."""
    return max(1, round(1.0 / sample_ratio))


def threshold_of_sample(magnitudes: Tensor, k: int, numel: int) -> float:
    """The threshold of :func:`sampled_threshold` from the sampled magnitudes of a ``numel``-long tensor."""
    ns = magnitudes.numel()
    if ns == 0 or k <= 0:  # tensor shorter than the offset: no estimate, the caller goes exact
        return 0.0
    ks = min(ns, max(1, math.ceil(k * SAMPLE_OVERSHOOT * ns / numel)))
    return float(torch.topk(magnitudes, ks, sorted=False).values.min())


# ------------------------------------------------------------------------------------------- candidates
def _cat(parts: list[list[Tensor]], device: torch.device) -> Tensor:
    """Concatenate the index tensors that the ranges of :func:`_over_chunks` returned, in order."""
    flat = [t for part in parts for t in part]
    return torch.cat(flat) if flat else torch.empty(0, dtype=torch.int64, device=device)


def _scan_above(x: Tensor, thr: float, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """All live indices with ``|x| >= thr``, by a chunked scan of the whole tensor (ascending)."""
    step = _piece(x.device)

    def run(lo: int, hi: int) -> list[Tensor]:
        scratch = torch.empty(min(hi - lo, step), dtype=dtype, device=x.device)
        found = []
        for start in range(lo, hi, step):
            stop = min(start + step, hi)
            hit = _abs_into(x[start:stop], scratch[: stop - start]) >= thr
            if mask is not None:
                hit &= mask[start:stop]
            found.append(torch.nonzero(hit).squeeze(1).add_(start))
        return found

    return _cat(_over_chunks(x.numel(), run, x.device), x.device)


def _blocks_above(block_max: Tensor, thr: float) -> Tensor:
    """Indices (ascending) of the blocks whose maximum reaches ``thr``."""
    step = _piece(block_max.device)

    def run(lo: int, hi: int) -> list[Tensor]:
        return [
            torch.nonzero(block_max[s : min(s + step, hi)] >= thr).squeeze(1).add_(s)
            for s in range(lo, hi, step)
        ]

    return _cat(_over_chunks(block_max.numel(), run, block_max.device), block_max.device)


def _hits_in_blocks(
    x: Tensor, blocks: Tensor, thr: float, mask: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """Live indices with ``|x| >= thr`` inside the given full blocks (ascending), CHUNK elements at a time."""
    full = x.numel() // BLOCK
    rows_of = x[: full * BLOCK].view(full, BLOCK)
    mask_of = None if mask is None else mask[: full * BLOCK].view(full, BLOCK)
    group = _piece(x.device, CHUNK // BLOCK)

    def run(lo: int, hi: int) -> list[Tensor]:
        found = []
        for s in range(lo, hi, group):
            b = blocks[s : min(s + group, hi)]
            hit = rows_of.index_select(0, b).abs_().to(dtype) >= thr
            if mask_of is not None:
                hit &= mask_of.index_select(0, b)
            r, c = torch.nonzero(hit, as_tuple=True)  # row-major: ascending positions
            found.append(b.index_select(0, r).mul_(BLOCK).add_(c))
        return found

    return _cat(_over_chunks(blocks.numel(), run, x.device, group), x.device)


def candidates_above(
    x: Tensor, block_max: Tensor, thr: float, mask: Tensor | None = None
) -> Tensor:
    """Indices (int64, ascending) of all entries with ``|x| >= thr``, masked entries excluded.

    Only blocks whose maximum reaches ``thr`` are read (all of ``x`` when most blocks do).
    """
    x = x.detach().reshape(-1)
    n = x.numel()
    dtype = block_max.dtype
    flat_mask = None if mask is None else mask.reshape(-1)
    blocks = _blocks_above(block_max, thr)
    if blocks.numel() * _DENSE_SCAN_FRACTION > block_max.numel():
        return _scan_above(x, thr, flat_mask, dtype)
    full = n // BLOCK
    if blocks.numel() and n % BLOCK and int(blocks[-1]) == full:  # the short last block, on its own
        t = x[full * BLOCK :].abs().to(dtype) >= thr
        if flat_mask is not None:
            t &= flat_mask[full * BLOCK :]
        tail = torch.nonzero(t).squeeze(1).add_(full * BLOCK)
        return torch.cat((_hits_in_blocks(x, blocks[:-1], thr, flat_mask, dtype), tail))
    return _hits_in_blocks(x, blocks, thr, flat_mask, dtype)


# -------------------------------------------------------------------------------------------- selection
def _in_order(positions: Tensor, length: int) -> Tensor:
    """``positions`` (unique, any order) in ascending order, by marking them in a ``length``-long
    boolean map: O(length), and no ``torch.sort`` (whose parallel CPU version stalls on a busy machine)."""
    keep = torch.zeros(length, dtype=torch.bool, device=positions.device)
    keep.index_fill_(0, positions, True)
    return torch.nonzero(keep).squeeze(1)


def largest(key: Tensor, k: int) -> Tensor:
    """Positions (int64, ascending) of the ``k`` largest entries of the flat, NaN-free ``key``; among
    entries equal to the k-th largest value the lowest positions win, so the result is unique (the
    same set on every backend and every thread count)."""
    if k >= key.numel():
        return torch.arange(key.numel(), device=key.device)
    kth = torch.topk(key, k, sorted=False).values.min()
    keep = key > kth
    need = k - int(keep.sum())
    if need:
        keep.index_fill_(0, torch.nonzero(key == kth).squeeze(1)[:need], True)
    return torch.nonzero(keep).squeeze(1)


def _finish(x: Tensor, k: int, cand: Tensor) -> Tensor:
    """The k candidates of largest |x| (candidates ascending, at least k of them, none NaN); int64
    ascending, ties to the lowest index."""
    if cand.numel() == k:
        return cand
    return cand.index_select(0, largest(x.index_select(0, cand).abs(), k))


def _direct_topk(x: Tensor, k: int, mask: Tensor | None) -> Tensor:
    """Exact top-k by a full ``torch.topk`` of the magnitudes (k above the number of blocks, or a
    threshold spoiled by NaN); NaN counts as +inf, ties go to the lowest index."""
    a = torch.nan_to_num_(x.abs().to(_summary_dtype(x.dtype)), nan=math.inf)
    if mask is not None:
        a.masked_fill_(~mask, -1.0)
    idx = largest(a, k)
    if mask is not None and k and float(a.index_select(0, idx).min()) < 0:
        raise ValueError(f"k = {k} exceeds the number of unmasked entries ({int(mask.sum())})")
    return idx


Candidates = Callable[[float], Tensor]
"""``thr -> ascending indices of the live entries with |x| >= thr`` (:func:`candidates_above`)."""


def _select(
    x: Tensor,
    k: int,
    sample_ratio: float,
    offset: int,
    block_max: Tensor,
    mask: Tensor | None,
    *,
    find: Candidates | None = None,
    first_threshold: float | None = None,
) -> Tensor:
    """:func:`select_topk` on a flat ``x`` whose block maxima are known.

    ``find`` and ``first_threshold`` (the sampled threshold, when the caller already has the sample) let
    the compiled CPU path run the same sequence of thresholds with its own candidate search.
    """
    if find is None:

        def find(thr: float) -> Tensor:
            return candidates_above(x, block_max, thr, mask)

    if sample_ratio < 1.0:
        thr = first_threshold
        if thr is None:
            thr = sampled_threshold(x, k, sample_ratio, offset)
        for _ in range(1 + MAX_THRESHOLD_RETRIES):  # the first try, then up to 10 lowered thresholds
            if not thr > 0.0:  # no estimate (or NaN): go exact
                break
            cand = find(thr)
            if cand.numel() >= k:
                return _finish(x, k, cand)
            thr *= THRESHOLD_DECAY
    thr = exact_threshold(block_max, k)
    if thr > 0.0:
        cand = find(thr)
        if cand.numel() >= k:  # always, barring NaN in x
            return _finish(x, k, cand)
    return _direct_topk(x, k, mask)


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
    than ``k`` entries pass (see docs/algorithm.md#selection); the block threshold
    is the fallback, and a full ``torch.topk`` when ``k`` exceeds the number of blocks.  Either way the
    result is the exact top-k set, ties at the k-th magnitude going to the lowest indices (the oracle:
    :func:`dgc.kernels.plain.topk_reference`).  ``k`` must not exceed the number of unmasked entries.
    ``block_max`` (from :func:`block_absmax` with the same mask) saves a pass over ``x``.
    """
    x = x.detach().reshape(-1)
    n = x.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} must be in [0, x.numel() = {n}]")
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    flat_mask = None if mask is None else mask.reshape(-1)
    if block_max is None:
        block_max = _summarize(x, flat_mask)
    return _select(x, k, sample_ratio, offset, block_max, flat_mask)


# --------------------------------------------------------------------------------------- compress, unpack
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

    ``grad`` (any float dtype), ``momentum`` u and ``residual`` v (float32, contiguous, updated in place):

    1. momentum correction ``u <- beta*u + g`` (Nesterov: ``u <- beta*(u + g)``, and v gets ``u + g``);
    2. local accumulation ``v <- v + u``;
    3. selection of the ``k`` entries of largest ``|v|`` (masked entries never), as :func:`select_topk`;
    4. packing: ``out_indices`` (int32) and ``out_values`` (wire dtype, saturated to its finite range, see
       :func:`saturate`) receive the pairs;
    5. momentum factor masking: ``u[sel] <- 0``; ``v[sel] <- v[sel] - sent`` (zero in float32; the wire
       dtype's rounding error otherwise, so nothing is lost).

    With ``mask`` the gradient is multiplied by it first, so masked u and v stay zero.  ``momentum`` may be
    None (then v simply accumulates g).  A float64 ``grad`` is rounded to float32 before step 1.  Returns
    the selected indices (int64, ascending) for callers that need them.  The same steps, unfused and
    readable, are :func:`dgc.kernels.plain.dgc_step_reference` (the test oracle).
    """
    n = grad.numel()
    check_k(k, n)
    g = grad.detach().reshape(-1)
    v = check_state("residual", residual, n)
    u = None if momentum is None else check_state("momentum", momentum, n)
    fm = None if mask is None else mask.reshape(-1)
    block_max = torch.empty(_num_blocks(n), dtype=torch.float32, device=v.device)
    _over_chunks(n, _update_chunks(g, u, v, fm, block_max, beta, nesterov), v.device)  # steps 1-2
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=v.device)
    idx = _select(v, k, sample_ratio, offset, block_max, fm)  # step 3
    pack(v, u, idx, out_indices, out_values, momentum_masking)  # steps 4-5
    return idx


def dense_momentum(g: Tensor, u: Tensor, momentum: float, divide: float) -> None:
    """The dense path's step for a tensor whose residual is zero (``dgc.compressor.compress_dense_direct``),
    in place: ``u <- g + momentum * u``, then ``g <- u / divide`` (the payload the allreduce sums;
    ``divide == 1``: a copy of u).  ``g`` and ``u``: float32, the same shape.

    Two torch operations, two passes over memory; the compiled path does them in one with these bits.
    """
    torch.add(g, u, alpha=momentum, out=u)
    if divide == 1:
        g.copy_(u)
    else:
        torch.div(u, divide, out=g)


def dense_momentum_many(gs: Sequence[Tensor], us: Sequence[Tensor], momentum: float, divide: float) -> None:
    """:func:`dense_momentum` for every pair ``gs[j]``, ``us[j]`` (a bucket's tensors), in order."""
    if len(gs) != len(us):
        raise ValueError(f"dense_momentum_many: {len(gs)} gradients but {len(us)} momentum tensors")
    for g, u in zip(gs, us, strict=True):
        dense_momentum(g, u, momentum, divide)


def check_k(k: int, n: int) -> None:
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} must be in [0, grad.numel() = {n}]")


def check_state(name: str, t: Tensor, n: int) -> Tensor:
    """``t`` flattened, as a view: DGC's state is updated in place, so a copy would lose the update."""
    if t.numel() != n or not t.is_contiguous():
        raise ValueError(
            f"compress_step: {name} must be a contiguous tensor of {n} elements (the gradient's size), "
            f"got {t.numel()} elements, contiguous={t.is_contiguous()}; keep DGC's state in "
            "torch.zeros(numel, dtype=torch.float32)"
        )
    return t.view(-1)


def _update_chunks(
    g: Tensor, u: Tensor | None, v: Tensor, fm: Tensor | None, block_max: Tensor, beta: float,
    nesterov: bool,
) -> Callable[[int, int], None]:  # fmt: skip
    """Steps 1-2 and the block maxima of ``|v|`` over a range, chunk by chunk (for :func:`_over_chunks`)."""
    convert = fm is not None or g.dtype != torch.float32
    step = _piece(v.device)

    def run(lo: int, hi: int) -> None:
        scratch = torch.empty(min(hi - lo, step), dtype=torch.float32, device=v.device)
        # Masked or non-float32 gradients are first written, as float32, into a second scratch buffer,
        # so that the momentum step is always the same float32 operation (mixed-dtype kernels may round
        # differently).
        gbuf = torch.empty_like(scratch) if convert else scratch
        for start in range(lo, hi, step):
            stop = min(start + step, hi)
            gc, vc = g[start:stop], v[start:stop]
            mc = None if fm is None else fm[start:stop]
            if mc is not None:
                gc = torch.mul(gc, mc, out=gbuf[: stop - start])
            elif convert:
                gc = gbuf[: stop - start].copy_(gc)
            if u is None:  # Step 2 alone
                vc.add_(gc)
            else:
                uc = u[start:stop]
                if nesterov:  # Step 1 (Nesterov) and 2
                    uc.add_(gc).mul_(beta)
                    vc.add_(uc).add_(gc)
                else:  # Steps 1 and 2
                    torch.add(gc, uc, alpha=beta, out=uc)
                    vc.add_(uc)
            _absmax_into(vc, block_max[start // BLOCK : _num_blocks(stop)], scratch, mc)

    return run


def pack(
    v: Tensor, u: Tensor | None, idx: Tensor, out_indices: Tensor, out_values: Tensor,
    momentum_masking: bool,
) -> None:  # fmt: skip
    """Steps 4-5 for the selected ``idx``: the pairs into the outputs (values saturated to the wire
    dtype), the wire's rounding error (0 in float32) left in v, and momentum factor masking."""
    sent = v.index_select(0, idx)
    out_indices.copy_(idx)
    out_values.copy_(saturate(sent, out_values.dtype))
    if out_values.dtype == torch.float32:
        v.index_fill_(0, idx, 0.0)
    else:
        v.index_copy_(0, idx, sent.sub_(out_values.float()))
    if u is not None and momentum_masking:
        u.index_fill_(0, idx, 0.0)


def saturate(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` clamped to the finite range of ``dtype`` (the wire dtype), NaN unchanged; ``x`` itself when
    ``dtype`` holds every float32.  Cast after this, a value beyond the wire's range sends the largest
    finite value and leaves the excess in the residual, where a plain cast would send inf (poisoning
    every rank's sum) and leave -inf behind.  The kernels do the same (``dgc_saturate``)."""
    if dtype in (torch.float32, torch.float64) or not x.is_floating_point():
        return x
    limit = torch.finfo(dtype).max
    return x.clamp(-limit, limit)


def scatter_unpack(out: Tensor, indices: Tensor, values: Tensor, world_size: int) -> Tensor:
    """Sum ``world_size`` workers' ``(index, value)`` pairs into the dense ``out`` and divide by N.

    ``out`` is overwritten.  ``indices``/``values`` hold ``world_size`` equal-length segments, one per
    worker; within a segment indices are unique, so adding segment by segment in rank order gives the same
    bits on every rank and every device.  A half-precision ``out`` is accumulated in float32.
    """
    flat = out.reshape(-1)
    acc = flat if flat.dtype == torch.float32 else torch.empty_like(flat, dtype=torch.float32)
    acc.zero_()
    idx = indices.reshape(world_size, -1).long()
    val = values.reshape(world_size, -1)
    for r in range(world_size):
        acc.index_add_(0, idx[r], val[r].float())
    divide_sum(acc, idx, world_size)
    if acc is not flat:
        flat.copy_(acc)
    return out


def divide_sum(acc: Tensor, indices: Tensor, world_size: int) -> None:
    """``acc /= world_size``, touching only the summed positions when they are few (0 / N = 0)."""
    if world_size == 1:
        return
    if indices.numel() * _DENSE_SCAN_FRACTION < acc.numel():
        # A position sent by several workers is divided once per occurrence, each time from the same
        # complete sum, so every copy writes the same bits.
        touched = indices.reshape(-1).long()
        acc.index_copy_(0, touched, acc.index_select(0, touched).div_(world_size))
    else:
        acc.div_(world_size)
