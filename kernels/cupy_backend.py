"""CuPy (CUDA C) kernels of DGC: the GPU path, with exactly the semantics of :mod:`.reference`.

Importing this module raises ``ImportError`` when CuPy is missing; :func:`is_available` tells whether a
CUDA device can run the kernels.  The CUDA C lives next to this file (``dgc_common.cuh`` and ``*.cu``):
it is read from the package directory, the header inlined, and compiled once per device by NVRTC
(``cupy.RawModule`` under ``@cupy.memoize(for_each_device=True)``).  Every launch goes to PyTorch's
current stream (``cupy.cuda.ExternalStream``), and tensors are shared without copies by DLPack
(``cupy.from_dlpack``); bfloat16 travels as int16 and is decoded in-kernel.  On devices below sm_80 the
bfloat16 cast is compiled in integer arithmetic (``DGC_SOFT_BF16``), with the same rounding.

The kernels (see the .cu files for the exact arithmetic):

``dgc_fused_update``  steps 1-2 and the block maxima of step 3 in one pass over g, u, v;
``dgc_block_absmax``  block maxima of ``|x|`` for a bare :func:`select_topk`;
``dgc_count_above`` / ``dgc_compact_above``  count-and-compact of the entries ``>= thr``, reading only
                      the blocks whose maximum reaches ``thr``, output in ascending index order;
``dgc_pack``          steps 4-5: the pairs straight into the wire buffer (cast in-kernel), the rounding
                      error kept in v, momentum factor masking;
``dgc_scatter_add``   one worker's pairs into the dense accumulator (one launch per rank, in order).

Small host-side steps use torch on the same stream: the 1% sample's ``topk`` (the threshold stays on the
device, so lowering it costs no transfer), the prefix sum of the per-block counts, and the final
``topk`` among the ~k candidates.  One device synchronization per threshold tried reads the candidate
count.  Inputs of other dtypes (float64) go to the torch twins, on the GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

try:
    import cupy
except Exception as exc:  # not installed, or a broken CUDA install: the torch twins serve
    raise ImportError(f"dgc.kernels.cupy_backend needs CuPy (pip install 'dgc[cuda]'): {exc}") from exc

from . import reference
from .reference import (
    BLOCK,
    MAX_THRESHOLD_RETRIES,
    SAMPLE_OVERSHOOT,
    THRESHOLD_DECAY,
    exact_threshold,
    sampled_threshold,
)

__all__ = [
    "block_absmax",
    "candidates_above",
    "compress_step",
    "dense_momentum",
    "dense_momentum_many",
    "exact_threshold",
    "is_available",
    "kernel_source",
    "sampled_threshold",
    "scatter_unpack",
    "select_topk",
]

_DIR = Path(__file__).resolve().parent
_HEADER = "dgc_common.cuh"
_THREADS = 256  # threads per CUDA block: 8 warps
_CTAS_PER_SM = 8  # 8 x 256 = 2048 resident threads per SM (the kernels use <= 32 registers)
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # DGC_F32 / DGC_F16 / DGC_BF16
_NULL = np.uint64(0)  # an absent optional array: a null pointer (never dereferenced, flag is 0)
_MAX_INT32_INDEX = 2**31 - 1


def kernel_source() -> str:
    """The CUDA C handed to NVRTC: ``dgc_common.cuh`` followed by every ``*.cu`` of the package, with
    their ``#include`` of the header removed (NVRTC gets no include path)."""
    parts = [(_DIR / _HEADER).read_text()]
    for path in sorted(_DIR.glob("*.cu")):
        body = path.read_text().replace(f'#include "{_HEADER}"', f"// (inlined {_HEADER})")
        parts.append(f"// ---------------- {path.name}\n{body}")
    return "\n".join(parts)


def is_available() -> bool:
    """True when the kernels can run: a CUDA device visible to torch and CuPy, and NVRTC loadable
    (CuPy compiles the kernels with it; ``pip install 'cupy-cuda12x[ctk]'`` brings it)."""
    try:
        if not (torch.cuda.is_available() and cupy.cuda.is_available()):
            return False
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:  # driver/runtime mismatch, NVRTC missing and the like: no GPU path
        return False


# ---------------------------------------------------------------------------------------------- launch
@cupy.memoize(for_each_device=True)
def _module() -> cupy.RawModule:
    return cupy.RawModule(code=kernel_source(), options=("-std=c++17",))


@cupy.memoize(for_each_device=True)
def _kernel(name: str) -> cupy.RawKernel:
    return _module().get_function(name)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_STREAMS: dict[tuple[int, int], object] = {}


def _cupy_stream(index: int) -> object:
    """CuPy's handle of PyTorch's current stream on device ``index`` (cached by stream handle)."""
    handle = torch.cuda.current_stream(index).cuda_stream
    stream = _STREAMS.get((index, handle))
    if stream is None:
        if len(_STREAMS) > 64:  # streams come and go; the wrappers hold nothing but the handle
            _STREAMS.clear()
        with warnings.catch_warnings():  # CuPy 14 prefers Stream.from_external; same object
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = cupy.cuda.ExternalStream(handle, index)
        _STREAMS[(index, handle)] = stream
    return stream


@contextlib.contextmanager
def _on_torch_stream(device: torch.device) -> Iterator[int]:
    """Make ``device`` CuPy's current device and PyTorch's current stream CuPy's current stream."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index), _cupy_stream(index):
        yield index


def _launch(name: str, index: int, units: int, per_cta: int, args: tuple) -> None:
    """Launch kernel ``name`` with enough 256-thread CTAs for ``units`` work items of ``per_cta`` per
    CTA, capped at one full wave (grid-stride loops do the rest).  Nothing is launched for no work."""
    if units <= 0:
        return
    grid = max(1, min(math.ceil(units / per_cta), _CTAS_PER_SM * _sm_count(index)))
    _kernel(name)((grid,), (_THREADS,), args)


def _warp_blocks(name: str, index: int, numel: int, args: tuple) -> None:
    """Launch a warp-per-block kernel over the ``ceil(numel / BLOCK)`` blocks."""
    _launch(name, index, (numel + BLOCK - 1) // BLOCK, _THREADS // 32, args)


def _arr(t: Tensor) -> cupy.ndarray:
    """Zero-copy CuPy view of a CUDA tensor, shared by DLPack; bfloat16 as int16 and bool as uint8 (same
    bytes: CuPy has no bfloat16).  Called inside :func:`_on_torch_stream`, so the consumer stream CuPy
    hands to ``__dlpack__`` is PyTorch's current stream and no synchronization is inserted."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return cupy.from_dlpack(t)


def _opt(t: Tensor | None) -> tuple[object, np.int32]:
    """An optional array argument and its presence flag."""
    return (_NULL, np.int32(0)) if t is None else (_arr(t), np.int32(1))


# ------------------------------------------------------------------------------------------ validation
def _need_cuda(name: str, t: Tensor, device: torch.device | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(
            f"{name} is on {t.device}; the CuPy kernels need CUDA tensors. Move it to the GPU or use "
            "the torch twins (DGCConfig(backend='torch'))."
        )
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the data is on {device}: put both on one device.")


def _need_state(name: str, t: Tensor, numel: int, device: torch.device) -> Tensor:
    """A flat float32 view of a state tensor that is updated in place (so no copy is allowed)."""
    _need_cuda(name, t, device)
    if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != numel:
        raise ValueError(
            f"{name} must be a contiguous float32 tensor of {numel} elements (updated in place), got "
            f"{t.dtype}, {t.numel()} elements, contiguous={t.is_contiguous()}."
        )
    return t.view(-1)


def _need_mask(mask: Tensor | None, numel: int, device: torch.device) -> Tensor | None:
    if mask is None:
        return None
    _need_cuda("mask", mask, device)
    if mask.dtype != torch.bool or mask.numel() != numel:
        raise ValueError(f"mask must be a bool tensor of {numel} elements, got {mask.dtype} of {mask.numel()}")
    return mask.reshape(-1).contiguous()


def _need_block_max(block_max: Tensor | None, numel: int, device: torch.device) -> Tensor | None:
    if block_max is None:
        return None
    _need_cuda("block_max", block_max, device)
    nb = (numel + BLOCK - 1) // BLOCK
    if block_max.dtype != torch.float32 or block_max.numel() != nb:
        raise ValueError(
            f"block_max must be float32 with ceil(numel / {BLOCK}) = {nb} entries (from block_absmax), "
            f"got {block_max.dtype} of {block_max.numel()}"
        )
    return block_max.reshape(-1).contiguous()


def _need_k(k: int, numel: int) -> None:
    if not isinstance(k, int) or not 0 <= k <= numel:
        raise ValueError(f"k = {k!r} must be an integer in [0, numel = {numel}]")


# ------------------------------------------------------------------------------------------- selection
def _block_absmax(x: Tensor, mask: Tensor | None, index: int) -> Tensor:
    n = x.numel()
    out = torch.empty((n + BLOCK - 1) // BLOCK, dtype=torch.float32, device=x.device)
    m, has_m = _opt(mask)
    _warp_blocks(
        "dgc_block_absmax", index, n, (_arr(x), np.int32(_KIND[x.dtype]), m, has_m, _arr(out), np.int64(n))
    )
    return out


def _count(x: Tensor, mask: Tensor | None, block_max: Tensor, thr: Tensor, index: int) -> Tensor:
    """Inclusive prefix sums (int64) of the per-block counts of live entries with ``|x| >= thr``."""
    n = x.numel()
    counts = torch.empty(block_max.numel(), dtype=torch.int32, device=x.device)
    m, has_m = _opt(mask)
    args = (_arr(x), np.int32(_KIND[x.dtype]), m, has_m, _arr(block_max), _arr(thr), _arr(counts), np.int64(n))
    _warp_blocks("dgc_count_above", index, n, args)
    return torch.cumsum(counts, 0)


def _compact(
    x: Tensor, mask: Tensor | None, block_max: Tensor, thr: Tensor, ends: Tensor, total: int, index: int
) -> tuple[Tensor, Tensor]:
    """Positions (int64, ascending) and magnitudes (float32) of the entries counted by :func:`_count`."""
    n = x.numel()
    idx = torch.empty(total, dtype=torch.int64, device=x.device)
    mag = torch.empty(total, dtype=torch.float32, device=x.device)
    if total:
        m, has_m = _opt(mask)
        args = (
            _arr(x), np.int32(_KIND[x.dtype]), m, has_m, _arr(block_max), _arr(thr), _arr(ends),
            _arr(idx), _arr(mag), np.int64(n),
        )  # fmt: skip
        _warp_blocks("dgc_compact_above", index, n, args)
    return idx, mag


def _read(total: Tensor, thr: Tensor) -> tuple[int, float]:
    """The candidate count and the threshold, in one device-to-host transfer (the one sync per try)."""
    count, t = torch.stack((total.to(torch.float64), thr.reshape(()).to(torch.float64))).tolist()
    return int(count), t


def _sampled_threshold(x: Tensor, k: int, sample_ratio: float, offset: int) -> Tensor | None:
    """:func:`reference.sampled_threshold`, left on the device as a float32 tensor of shape (1,)."""
    n = x.numel()
    stride = max(1, round(1.0 / sample_ratio))
    sample = x[offset % stride :: stride]
    if sample.numel() == 0:
        return None
    ks = min(sample.numel(), max(1, math.ceil(k * SAMPLE_OVERSHOOT * sample.numel() / n)))
    return torch.topk(sample.abs().float(), ks, sorted=False).values.min().reshape(1)


def _select(
    x: Tensor,
    k: int,
    sample_ratio: float,
    offset: int,
    block_max: Tensor | None,
    mask: Tensor | None,
    index: int,
) -> Tensor:
    """:func:`reference.select_topk` for a flat contiguous float32/float16/bfloat16 CUDA ``x``."""
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    if block_max is None:
        block_max = _block_absmax(x, mask, index)

    def finish(thr: Tensor, ends: Tensor, total: int) -> Tensor:
        idx, mag = _compact(x, mask, block_max, thr, ends, total, index)
        if total == k:
            return idx
        return idx.index_select(0, reference.largest(mag, k))  # ties to the lowest index, as the twin

    if sample_ratio < 1.0:
        thr = _sampled_threshold(x, k, sample_ratio, offset)
        for _ in range(0 if thr is None else 1 + MAX_THRESHOLD_RETRIES):
            ends = _count(x, mask, block_max, thr, index)
            total, t = _read(ends[-1], thr)
            if not t > 0.0:  # no estimate (or NaN): go exact
                break
            if total >= k:
                return finish(thr, ends, total)
            thr.mul_(THRESHOLD_DECAY)
    if k <= block_max.numel():  # the k-th largest block maximum: at least k entries reach it
        thr = torch.topk(block_max, k, sorted=False).values.min().reshape(1)
        ends = _count(x, mask, block_max, thr, index)
        total, t = _read(ends[-1], thr)
        if t > 0.0 and total >= k:
            return finish(thr, ends, total)
    return reference._direct_topk(x, k, mask)


def block_absmax(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """:func:`reference.block_absmax` on the GPU (float64 input: the twin)."""
    _need_cuda("x", x)
    if x.dtype not in _KIND:
        return reference.block_absmax(x, mask)
    x = x.reshape(-1).contiguous()
    mask = _need_mask(mask, x.numel(), x.device)
    with _on_torch_stream(x.device) as index:
        return _block_absmax(x, mask, index)


def candidates_above(x: Tensor, block_max: Tensor, thr: float, mask: Tensor | None = None) -> Tensor:
    """:func:`reference.candidates_above` on the GPU: count, prefix sum, compact (one sync)."""
    _need_cuda("x", x)
    if x.dtype not in _KIND:
        return reference.candidates_above(x, block_max, thr, mask)
    x = x.reshape(-1).contiguous()
    n = x.numel()
    mask = _need_mask(mask, n, x.device)
    block_max = _need_block_max(block_max, n, x.device)
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    t = torch.full((1,), thr, dtype=torch.float32, device=x.device)
    with _on_torch_stream(x.device) as index:
        if block_max is None:
            block_max = _block_absmax(x, mask, index)
        ends = _count(x, mask, block_max, t, index)
        return _compact(x, mask, block_max, t, ends, int(ends[-1]), index)[0]


def select_topk(
    x: Tensor,
    k: int,
    *,
    sample_ratio: float = 0.01,
    offset: int = 0,
    block_max: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """:func:`reference.select_topk` on the GPU: indices (int64, ascending) of the exact top-k of ``|x|``.

    Sampled threshold (strided sample from ``offset``), lowered x0.8 at most 10 times while fewer than
    ``k`` entries pass, then the exact block threshold, then a full ``torch.topk``; always exactly ``k``.
    """
    _need_cuda("x", x)
    if x.dtype not in _KIND:
        return reference.select_topk(
            x, k, sample_ratio=sample_ratio, offset=offset, block_max=block_max, mask=mask
        )
    x = x.reshape(-1).contiguous()
    n = x.numel()
    _need_k(k, n)
    mask = _need_mask(mask, n, x.device)
    block_max = _need_block_max(block_max, n, x.device)
    with _on_torch_stream(x.device) as index:
        return _select(x, k, sample_ratio, offset, block_max, mask, index)


# -------------------------------------------------------------------------------------- compress, unpack
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
    """:func:`reference.compress_step` on the GPU: one fused pass (momentum correction, accumulation,
    mask, block maxima), the selection, then one launch that packs the pairs into ``out_indices``
    (int32) / ``out_values`` (float32/float16/bfloat16) and masks the momentum.  Returns the indices."""
    _need_cuda("grad", grad)
    device = grad.device
    n = grad.numel()
    _need_k(k, n)
    if n > _MAX_INT32_INDEX:
        raise ValueError(f"compress_step sends int32 indices: at most {_MAX_INT32_INDEX} elements, got {n}")
    v = _need_state("residual", residual, n, device)
    u = None if momentum is None else _need_state("momentum", momentum, n, device)
    g = grad.reshape(-1)
    if g.dtype not in _KIND:
        g = g.float()  # float64 gradients: rounded to float32 first, as the twin does
    g = g.contiguous()
    mask = _need_mask(mask, n, device)
    for name, t, dtypes in (
        ("out_indices", out_indices, (torch.int32,)),
        ("out_values", out_values, tuple(_KIND)),
    ):
        _need_cuda(name, t, device)
        if t.dtype not in dtypes or t.numel() != k:
            raise ValueError(f"{name} must have {k} elements of dtype {dtypes}, got {t.numel()} of {t.dtype}")
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    with _on_torch_stream(device) as index:
        # Steps 1-2, and the block maxima of |v| for step 3
        block_max = torch.empty((n + BLOCK - 1) // BLOCK, dtype=torch.float32, device=device)
        u_arg, has_u = _opt(u)
        m_arg, has_m = _opt(mask)
        args = (
            _arr(g), np.int32(_KIND[g.dtype]), u_arg, has_u, _arr(v), m_arg, has_m, _arr(block_max),
            np.int64(n), np.float32(beta), np.int32(bool(nesterov)),
        )  # fmt: skip
        _warp_blocks("dgc_fused_update", index, n, args)
        # Step 3
        idx = _select(v, k, sample_ratio, offset, block_max, mask, index)
        # Steps 4-5, straight into the wire buffer (through a temporary only if it is strided)
        if k:
            oi = out_indices.view(-1) if out_indices.is_contiguous() else out_indices.new_empty(k)
            ov = out_values.view(-1) if out_values.is_contiguous() else out_values.new_empty(k)
            zero_u = u is not None and momentum_masking
            args = (
                _arr(idx), np.int64(k), _arr(v), _arr(u) if zero_u else _NULL, np.int32(zero_u),
                _arr(oi), _arr(ov), np.int32(_KIND[ov.dtype]),
            )  # fmt: skip
            _launch("dgc_pack", index, k, _THREADS, args)
            if oi.data_ptr() != out_indices.data_ptr():
                out_indices.copy_(oi.view(out_indices.shape))
            if ov.data_ptr() != out_values.data_ptr():
                out_values.copy_(ov.view(out_values.shape))
    return idx


def scatter_unpack(out: Tensor, indices: Tensor, values: Tensor, world_size: int) -> Tensor:
    """:func:`reference.scatter_unpack` on the GPU: rank by rank (one launch each, in order), then /N."""
    _need_cuda("out", out)
    device = out.device
    _need_cuda("indices", indices, device)
    _need_cuda("values", values, device)
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if indices.numel() != values.numel() or indices.numel() % world_size:
        raise ValueError(
            f"indices ({indices.numel()}) and values ({values.numel()}) must hold world_size = "
            f"{world_size} equal segments"
        )
    if (
        not out.is_contiguous()
        or out.dtype not in _KIND
        or values.dtype not in _KIND
        or indices.dtype not in (torch.int32, torch.int64)
    ):
        return reference.scatter_unpack(out, indices, values, world_size)
    flat = out.view(-1)
    acc = flat if flat.dtype == torch.float32 else torch.empty_like(flat, dtype=torch.float32)
    acc.zero_()
    idx = indices.reshape(world_size, -1)
    val = values.reshape(world_size, -1)
    if idx.stride(1) != 1:
        idx = idx.contiguous()
    if val.stride(1) != 1:
        val = val.contiguous()
    k = idx.shape[1]
    n = acc.numel()
    with _on_torch_stream(device) as index:
        is64 = np.int32(idx.dtype == torch.int64)
        kind = np.int32(_KIND[val.dtype])
        for r in range(world_size if k else 0):  # in rank order: the same sums, bit for bit, anywhere
            args = (_arr(acc), np.int64(n), _arr(idx[r]), is64, _arr(val[r]), kind, np.int64(k))
            _launch("dgc_scatter_add", index, k, _THREADS, args)
    reference.divide_sum(acc, idx, world_size)
    if acc is not flat:
        flat.copy_(acc)
    return out


def dense_momentum(g: Tensor, u: Tensor, momentum: float, divide: float) -> None:
    """:func:`reference.dense_momentum` on the GPU: its two torch operations, on the current stream.

    Not a fused kernel yet: on CUDA ``torch.add(g, u, alpha=m)`` contracts to an fma and ``torch.div`` by
    a Python number multiplies by its reciprocal, so one kernel would have to reproduce both to keep the
    twin's bits, and that can only be checked on a GPU.  The two passes give those bits by construction."""
    reference.dense_momentum(g, u, momentum, divide)


def dense_momentum_many(gs: Sequence[Tensor], us: Sequence[Tensor], momentum: float, divide: float) -> None:
    """:func:`reference.dense_momentum_many` on the GPU (two torch operations per tensor, see
    :func:`dense_momentum`)."""
    reference.dense_momentum_many(gs, us, momentum, divide)
