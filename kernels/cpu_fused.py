"""The compiled CPU path of DGC: the torch twins' fused pass and candidate search as C++ loops.

:mod:`.reference` already does steps 1-2 and the block maxima in one chunked pass, but as a dozen torch
operations per chunk; here the same pass is one loop (``kernels/cpu_fused.cpp``): per element it reads g,
u, v, writes u, v, and per block of :data:`~.reference.BLOCK` elements one maximum, while the 1% sample
of ``|v|`` is picked up on the way.  The candidate search reads only the blocks whose maximum reaches the
threshold.  Everything else (the thresholds and their retries, the exact top-k among the candidates,
packing, step 5, :func:`scatter_unpack`) is the twins' own code, so the results are the twins' bits:
same selected set, same u and v (``tests/test_kernels_fast.py`` checks it, and a self-check at load
time refuses a build that disagrees with torch on this machine).  :func:`dense_momentum` is the dense
path's step (``u <- g + m u``, ``g <- u / divide``) in one pass instead of the twin's two.

Build: ``g++`` (or ``$CXX``) compiles the source once per source/compiler/CPU into
``~/.cache/dgc/kernels`` (``$XDG_CACHE_HOME``, or ``$DGC_KERNEL_CACHE``) in a few seconds, at the first
call; the library is loaded with :mod:`ctypes`, and calls release the GIL, so the twins' thread pool runs
the ranges in parallel.  Without a compiler (or with ``DGC_CPU_KERNELS=0``) one log line says so and
:func:`is_available` is False: :func:`dgc.kernels.backend_for` then hands out the twins.

Inputs: CPU tensors; gradients float32/float16/bfloat16/float64 (read as they are, float64 rounded to
float32 as the twins do); u and v float32 and contiguous (they are updated in place: anything else is a
``ValueError``/``TypeError``); other inputs are made contiguous by a copy.  Anything else (CUDA tensors,
float64 ``x`` in a bare selection) goes to the twins.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import itertools
import logging
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import reference
from .cpp_build import compile_cached
from .reference import (
    BLOCK,
    candidates_above,
    exact_threshold,
    sampled_threshold,
    saturate,
    scatter_unpack,
)

__all__ = [
    "block_absmax",
    "build",
    "candidates_above",
    "compress_step",
    "counter_load",
    "counter_store",
    "counters_ordered",
    "dense_momentum",
    "dense_momentum_many",
    "exact_threshold",
    "is_available",
    "sampled_threshold",
    "saturate",
    "scatter_unpack",
    "select_topk",
]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parent / "cpu_fused.cpp"

_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_ACCUMULATE, _MOMENTUM_FMA, _MOMENTUM_MUL_ADD, _NESTEROV, _READ_ONLY = 0, 1, 2, 3, -1

_ptr = ctypes.c_void_p
_i64 = ctypes.c_int64


# ------------------------------------------------------------------------------------------------ build
def build() -> Path:
    """Compile ``cpu_fused.cpp`` (once; cached) and return the shared library's path.

    Raises ``RuntimeError`` when no compiler is found or the compilation fails.
    """
    return compile_cached(_SOURCE, "cpu_fused")


@dataclass(frozen=True)
class _Library:
    dll: ctypes.CDLL
    momentum_mode: int
    """``_MOMENTUM_FMA`` or ``_MOMENTUM_MUL_ADD``: how ``torch.add(g, u, alpha=beta)`` rounds here."""


def _load(path: Path) -> ctypes.CDLL:
    dll = ctypes.CDLL(str(path))  # CDLL calls release the GIL
    dll.dgc_cpu_pass.restype = ctypes.c_int
    dll.dgc_cpu_pass.argtypes = [_ptr, ctypes.c_int, _ptr, _ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float,
                                 ctypes.c_int, _ptr, _i64, _i64]  # fmt: skip
    dll.dgc_cpu_candidates.restype = _i64
    dll.dgc_cpu_candidates.argtypes = [_ptr, ctypes.c_int, _ptr, _ptr, _i64, _i64, _i64, ctypes.c_float,
                                       ctypes.c_int, _ptr, _i64]  # fmt: skip
    dll.dgc_cpu_blocks_above.restype = _i64
    dll.dgc_cpu_blocks_above.argtypes = [_ptr, _i64, ctypes.c_float]
    dll.dgc_cpu_dense_momentum.restype = ctypes.c_int
    dll.dgc_cpu_dense_momentum.argtypes = [_ptr, _ptr, _i64, _i64, ctypes.c_float, ctypes.c_int, ctypes.c_float]
    dll.dgc_cpu_dense_momentum_many.restype = ctypes.c_int
    dll.dgc_cpu_dense_momentum_many.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, ctypes.c_float, ctypes.c_int,
                                                ctypes.c_float]  # fmt: skip
    dll.dgc_cpu_counter_store.restype = None
    dll.dgc_cpu_counter_store.argtypes = [_ptr, _i64]
    dll.dgc_cpu_counter_load.restype = _i64
    dll.dgc_cpu_counter_load.argtypes = [_ptr]
    return dll


def _momentum_mode(dll: ctypes.CDLL) -> int:
    """The C++ momentum step that rounds as ``torch.add(g, u, alpha=beta)`` does on this machine."""
    gen = torch.Generator().manual_seed(0)
    g, u = torch.randn(4099, generator=gen), torch.randn(4099, generator=gen)
    want = torch.add(g, u, alpha=0.9)
    for mode in (_MOMENTUM_FMA, _MOMENTUM_MUL_ADD):
        u2, v2 = u.clone(), torch.zeros_like(u)
        bm = torch.empty(reference._num_blocks(g.numel()))
        dll.dgc_cpu_pass(g.data_ptr(), 0, None, u2.data_ptr(), v2.data_ptr(), bm.data_ptr(), 0, g.numel(),
                         0.9, mode, None, 0, 0)  # fmt: skip
        if torch.equal(u2, want):
            return mode
    raise RuntimeError("torch.add(g, u, alpha) rounds neither as one fma nor as a multiply and an add")


def _self_check(lib: _Library) -> None:
    """The compiled passes against the twins on every mode, bit for bit (a miscompiled or mismatched
    build must not run)."""
    gen = torch.Generator().manual_seed(1)
    n = 3 * BLOCK * 100 + 37
    g = torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) > 0.3
    for momentum, nesterov, m, dtype in [(0.9, False, None, torch.float32), (0.9, True, mask, torch.bfloat16),
                                         (0.0, False, None, torch.float16), (0.9, False, mask, torch.float64)]:  # fmt: skip
        u0, v0 = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        out = []
        for fast in (False, True):
            u, v = u0.clone(), v0.clone()
            bm = torch.empty(reference._num_blocks(n))
            gd = g.to(dtype)
            uu = u if momentum else None
            if fast:
                _update(lib, gd, uu, v, m, bm, momentum, nesterov, None, 0, 0, 0, n)
            else:
                reference._update_chunks(gd, uu, v, m, bm, momentum, nesterov)(0, n)
            out.append((u, v, bm))
        for a, b in zip(*out):
            if not torch.equal(a, b):
                raise RuntimeError("the compiled pass disagrees with the torch twin on this machine")
    _self_check_dense(lib, g, torch.randn(n, generator=gen))


def _self_check_dense(lib: _Library, g: Tensor, u: Tensor) -> None:
    """The compiled dense-path pass against :func:`reference.dense_momentum`, divided and not."""
    for momentum, divide in [(0.9, 1), (0.9, 3), (0.5, 4)]:
        fast, twin = (g.clone(), u.clone()), (g.clone(), u.clone())
        _dense(lib, *fast, momentum, divide, 0, g.numel())
        reference.dense_momentum(*twin, momentum, divide)
        if not (torch.equal(fast[0], twin[0]) and torch.equal(fast[1], twin[1])):
            raise RuntimeError("the compiled dense-path pass disagrees with the torch twin on this machine")


@functools.cache
def _library() -> _Library | None:
    if os.environ.get("DGC_CPU_KERNELS", "1") == "0":
        _notice("DGC_CPU_KERNELS=0")
        return None
    try:
        dll = _load(build())
        lib = _Library(dll, _momentum_mode(dll))
        _self_check(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _notice(str(exc))
        return None
    return lib


def _notice(why: str) -> None:
    """The one log line of a fallback (rank 0 only, in a process group)."""
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
    (log.warning if rank0 else log.debug)(
        "dgc.kernels: compiled CPU kernels unavailable (%s); using the torch twins (about 2x slower)", why
    )


def is_available() -> bool:
    """True when the compiled CPU kernels are built (or build now), load and pass their self-check."""
    return _library() is not None


# ---------------------------------------------------------------------------------------- the C++ calls
def _addr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _update(
    lib: _Library, g: Tensor, u: Tensor | None, v: Tensor, mask: Tensor | None, bm: Tensor, beta: float,
    nesterov: bool, sample: Tensor | None, stride: int, first: int, lo: int, hi: int,
) -> None:  # fmt: skip
    """Steps 1-2 (or, with ``v is None``, nothing), block maxima and sample over ``[lo, hi)``."""
    if v is None:
        mode = _READ_ONLY
    elif u is None:
        mode = _ACCUMULATE
    else:
        mode = _NESTEROV if nesterov else lib.momentum_mode
    rc = lib.dll.dgc_cpu_pass(
        g.data_ptr(), _KIND[g.dtype], _addr(mask), _addr(u), _addr(v), bm.data_ptr(), lo, hi, beta, mode,
        _addr(sample), stride, first,
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"dgc_cpu_pass: unsupported dtype {g.dtype}")


def _dense(lib: _Library, g: Tensor, u: Tensor, momentum: float, divide: float, lo: int, hi: int) -> None:
    """The dense path's pass over ``[lo, hi)`` of contiguous float32 ``g`` and ``u``."""
    rc = lib.dll.dgc_cpu_dense_momentum(g.data_ptr(), u.data_ptr(), lo, hi, momentum, lib.momentum_mode, divide)
    if rc:
        raise RuntimeError(f"dgc_cpu_dense_momentum: unknown momentum mode {lib.momentum_mode}")


def _pass(
    lib: _Library, g: Tensor, u: Tensor | None, v: Tensor | None, mask: Tensor | None, beta: float,
    nesterov: bool, sample_ratio: float, offset: int,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """The block maxima of ``|v|`` (of ``|g|`` when ``v`` is None) after steps 1-2, and the strided
    sample of the same magnitudes (None when ``sample_ratio >= 1``), over all threads."""
    n = g.numel()
    bm = torch.empty(reference._num_blocks(n), dtype=torch.float32)
    sample, stride, first = None, 0, 0
    if sample_ratio < 1.0:
        stride = reference.sample_stride(sample_ratio)
        first = offset % stride
        sample = torch.empty(max(0, -(-(n - first) // stride)), dtype=torch.float32)

    def run(lo: int, hi: int) -> None:
        _update(lib, g, u, v, mask, bm, beta, nesterov, sample, stride, first, lo, hi)

    reference._over_chunks(n, run, g.device)
    return bm, sample


def _finder(lib: _Library, x: Tensor, mask: Tensor | None, bm: Tensor) -> reference.Candidates:
    """``thr -> candidates``, the compiled :func:`reference.candidates_above` (same scan-everything rule)."""
    n, nb = x.numel(), bm.numel()
    kind = _KIND[x.dtype]

    def find(thr: float) -> Tensor:
        blocks = lib.dll.dgc_cpu_blocks_above(bm.data_ptr(), nb, thr)
        scan_all = int(blocks * reference._DENSE_SCAN_FRACTION > nb)

        def run(lo: int, hi: int) -> Tensor:
            cap = hi - lo if scan_all else min(hi - lo, blocks * BLOCK)
            out = torch.empty(cap, dtype=torch.int64)
            count = lib.dll.dgc_cpu_candidates(
                x.data_ptr(), kind, _addr(mask), bm.data_ptr(), n, lo, hi, thr, scan_all, out.data_ptr(), cap
            )  # fmt: skip
            if not 0 <= count <= cap:
                raise RuntimeError(f"dgc_cpu_candidates returned {count} (capacity {cap})")
            return out[:count]

        parts = reference._over_chunks(n, run, x.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    return find


# ------------------------------------------------------------------------------------------ the checks
def _flat_input(name: str, t: Tensor) -> Tensor:
    """A read-only input, flat and contiguous (a copy only if it was strided)."""
    return t.detach().reshape(-1).contiguous()


def _flat_mask(mask: Tensor | None, n: int) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.numel() != n or mask.device.type != "cpu":
        raise ValueError(
            f"mask must be a CPU bool tensor of {n} elements (True = live), got {mask.dtype} of "
            f"{mask.numel()} on {mask.device}; pass mask.bool()"
        )
    return _flat_input("mask", mask)


def _fast(*tensors: Tensor | None) -> _Library | None:
    """The library when every tensor is on the CPU and it is available, else None (use the twins)."""
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        return None
    return _library()


def _float32_state(name: str, t: Tensor, n: int) -> Tensor:
    if t.dtype != torch.float32:
        raise TypeError(f"compress_step: {name} must be float32 (DGC keeps its state in float32), got {t.dtype}")
    return reference.check_state(name, t, n)


# ----------------------------------------------------------------------------------------------- the API
def block_absmax(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """:func:`reference.block_absmax`, compiled (float64 ``x``: the twin)."""
    lib = _fast(x, mask)
    if lib is None or x.dtype not in _KIND or x.dtype == torch.float64:
        return reference.block_absmax(x, mask)
    flat = _flat_input("x", x)
    return _pass(lib, flat, None, None, _flat_mask(mask, flat.numel()), 0.0, False, 1.0, 0)[0]


def select_topk(
    x: Tensor,
    k: int,
    *,
    sample_ratio: float = 0.01,
    offset: int = 0,
    block_max: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """:func:`reference.select_topk`, compiled: the same indices (int64, ascending)."""
    lib = _fast(x, mask, block_max)
    if lib is None or x.dtype not in _KIND or x.dtype == torch.float64 or k == 0:
        return reference.select_topk(
            x, k, sample_ratio=sample_ratio, offset=offset, block_max=block_max, mask=mask
        )
    flat = _flat_input("x", x)
    n = flat.numel()
    reference.check_k(k, n)
    fm = _flat_mask(mask, n)
    first = None
    if block_max is None:
        block_max, sample = _pass(lib, flat, None, None, fm, 0.0, False, sample_ratio, offset)
        first = None if sample is None else reference.threshold_of_sample(sample, k, n)
    else:
        block_max = _flat_input("block_max", block_max).float()
    return reference._select(
        flat, k, sample_ratio, offset, block_max, fm, find=_finder(lib, flat, fm, block_max),
        first_threshold=first,
    )  # fmt: skip


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
    """:func:`reference.compress_step`, compiled: the same selected set, the same bits of u and v."""
    lib = _fast(grad, momentum, residual, mask)
    if lib is None:
        return reference.compress_step(
            grad, momentum, residual, beta=beta, nesterov=nesterov, k=k, sample_ratio=sample_ratio,
            offset=offset, momentum_masking=momentum_masking, out_indices=out_indices,
            out_values=out_values, mask=mask,
        )  # fmt: skip
    if grad.dtype not in _KIND:
        raise TypeError(f"compress_step: grad must be a float tensor (float32/16, bfloat16, float64), got {grad.dtype}")
    g = _flat_input("grad", grad)
    n = g.numel()
    reference.check_k(k, n)
    v = _float32_state("residual", residual, n)
    u = None if momentum is None else _float32_state("momentum", momentum, n)
    fm = _flat_mask(mask, n)
    bm, sample = _pass(lib, g, u, v, fm, beta, nesterov, sample_ratio, offset)  # steps 1-2
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    first = None if sample is None else reference.threshold_of_sample(sample, k, n)
    idx = reference._select(
        v, k, sample_ratio, offset, bm, fm, find=_finder(lib, v, fm, bm), first_threshold=first
    )  # step 3
    reference.pack(v, u, idx, out_indices, out_values, momentum_masking)  # steps 4-5
    return idx


def dense_momentum(g: Tensor, u: Tensor, momentum: float, divide: float) -> None:
    """:func:`reference.dense_momentum` in one pass (read g and u, write u and g: 16 bytes per element
    instead of the twin's 20), with its bits: ``u <- g + momentum * u`` rounded as ``torch.add`` rounds
    here, ``g <- u / divide`` by a true division.  Contiguous float32 CPU tensors of the same size; anything
    else goes to the twin."""
    lib = _fast(g, u)
    fits = all(t.dtype == torch.float32 and t.is_contiguous() for t in (g, u)) and g.shape == u.shape
    if lib is None or not fits:
        reference.dense_momentum(g, u, momentum, divide)
        return
    gf, uf = g.view(-1), u.view(-1)

    def run(lo: int, hi: int) -> None:
        _dense(lib, gf, uf, momentum, divide, lo, hi)

    reference._over_chunks(gf.numel(), run, g.device)


def dense_momentum_many(gs: Sequence[Tensor], us: Sequence[Tensor], momentum: float, divide: float) -> None:
    """:func:`dense_momentum` over pairs ``gs[j]``, ``us[j]`` (e.g. every tensor of a bucket) in one compiled
    call per thread instead of one Python call per tensor, with the same bits; the threads split the
    tensors' concatenation.  Pairs that do not fit (not contiguous float32 CPU tensors of one size) send
    the whole group to the twin."""
    if len(gs) != len(us):
        raise ValueError(f"dense_momentum_many: {len(gs)} gradients but {len(us)} momentum tensors")
    fits = all(g.dtype == torch.float32 == u.dtype and g.is_contiguous() and u.is_contiguous()
               and g.numel() == u.numel() for g, u in zip(gs, us, strict=True))
    lib = _fast(*gs, *us) if gs else None
    if lib is None or not fits:
        reference.dense_momentum_many(gs, us, momentum, divide)
        return
    starts = list(itertools.accumulate((g.numel() for g in gs), initial=0))
    g_ptr, u_ptr = [g.data_ptr() for g in gs], [u.data_ptr() for u in us]

    def run(lo: int, hi: int) -> None:
        jobs, j = [], bisect.bisect_right(starts, lo) - 1
        while lo < hi:
            end = min(hi, starts[j + 1])
            if end > lo:
                jobs.append((j, lo - starts[j], end - starts[j]))
            lo, j = end, j + 1
        k = len(jobs)
        rc = lib.dll.dgc_cpu_dense_momentum_many(
            (ctypes.c_void_p * k)(*(g_ptr[j] for j, _, _ in jobs)), (ctypes.c_void_p * k)(*(u_ptr[j] for j, _, _ in jobs)),
            (ctypes.c_int64 * k)(*(a for _, a, _ in jobs)), (ctypes.c_int64 * k)(*(b for _, _, b in jobs)), k,
            momentum, lib.momentum_mode, divide,
        )  # fmt: skip
        if rc:
            raise RuntimeError(f"dgc_cpu_dense_momentum_many: unknown momentum mode {lib.momentum_mode}")

    reference._over_chunks(starts[-1], run, gs[0].device)


# ------------------------------------------------------------------------ counters in shared memory
_TSO = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
"""x86 keeps stores in order and loads in order (total store order): plain int64 stores and loads of a
shared mapping publish and see earlier writes without fences."""


def counters_ordered() -> bool:
    """Whether :func:`counter_store` / :func:`counter_load` order the memory around them (release /
    acquire) here: the compiled kernels, or an x86 CPU."""
    return _library() is not None or _TSO


def counter_store(counters: Tensor, i: int, value: int) -> None:
    """``counters[i] = value`` (an int64 CPU tensor, e.g. a shared mapping), published after every
    earlier write of this thread (a release store)."""
    lib = _library()
    if lib is not None:
        lib.dll.dgc_cpu_counter_store(counters.data_ptr() + 8 * i, value)
    elif _TSO:
        counters[i] = value
    else:
        raise RuntimeError("dgc.kernels.counter_store needs the compiled CPU kernels on this CPU "
                           f"({platform.machine()}); see counters_ordered()")


def counter_load(counters: Tensor, i: int) -> int:
    """``counters[i]`` (an acquire load: writes published with the value are visible after it)."""
    lib = _library()
    if lib is not None:
        return int(lib.dll.dgc_cpu_counter_load(counters.data_ptr() + 8 * i))
    if _TSO:
        return int(counters[i])
    raise RuntimeError("dgc.kernels.counter_load needs the compiled CPU kernels on this CPU "
                       f"({platform.machine()}); see counters_ordered()")
