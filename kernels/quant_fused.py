"""The quantizers' fused CPU pass (``quant_fused.cpp``): encode (error-feedback add, scale, rounding,
packing, and on request the decoded values and the new residual) and decode (unpacking, scaling) in one
sweep per block.

Built like :mod:`.cpu_fused`: ``g++`` at first use (``-O3 -march=native -ffp-contract=off``), cached
under ``$DGC_KERNEL_CACHE`` (default ``~/.cache/dgc/kernels``) by a hash of the source, flags,
compiler and CPU features, loaded through ctypes (calls release the GIL; one range of whole blocks per
thread of ``torch.get_num_threads()``), and self-checked at load against the torch reference of
:mod:`dgc.quant` (bit for bit).  No compiler, a failed build or a failed check: one log line, and
:mod:`dgc.quant` runs its torch reference.  ``DGC_CPU_KERNELS=0`` turns it off, like the DGC kernels.

The arithmetic is the reference's, operation for operation (docs/kernels.md#quantizer-codec-cpu):
codes, scales, decoded values and residuals are the same bits; stochastic rounding uses the same
counter-based draws (:func:`dgc.quant.blocks.uniform`), so it is bit-identical too.  QSGD's L2 norms
are computed by torch (:func:`dgc.quant.blocks.scales_of`, the same call as the reference) and passed in.

Inputs: flat contiguous float32 CPU tensors (the caller converts); outputs preallocated by the caller.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import reference
from .cpp_build import compile_cached

__all__ = ["Grid", "METHOD_CODES", "build", "decode", "encode", "is_available"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parent / "quant_fused.cpp"

METHOD_CODES = {"int8": 0, "terngrad": 1, "qsgd": 2}
"""The kernel's number for each :attr:`dgc.quant.BlockQuantizer.method`."""

_TILE = 16384
"""Least elements per thread's range (smaller tensors run on the calling thread only)."""

_ptr = ctypes.c_void_p
_i64 = ctypes.c_int64
_int = ctypes.c_int
_u32 = ctypes.c_uint32


@dataclass(frozen=True, slots=True)
class Grid:
    """What the kernel needs to know of a quantizer."""

    method: str
    """``int8``, ``terngrad`` or ``qsgd``."""
    levels: int
    """Positive levels of the grid (int8: ``2**(bits-1) - 1``; TernGrad 1; QSGD ``s``)."""
    bits: int
    """Bits per code, 1..8."""
    stochastic: bool
    """Stochastic rounding with the counter-based draws keyed per call (else to nearest)."""


# ------------------------------------------------------------------------------------------------ build
def build() -> Path:
    """Compile ``quant_fused.cpp`` (once; cached) and return the shared library's path.

    Raises ``RuntimeError`` when no compiler is found or the compilation fails.
    """
    return compile_cached(_SOURCE, "quant_fused")


def _load(path: Path) -> ctypes.CDLL:
    dll = ctypes.CDLL(str(path))  # CDLL calls release the GIL
    dll.dgc_quant_encode.restype = None
    dll.dgc_quant_encode.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _int, _ptr, _i64, _i64, _i64, _i64,
                                     _int, _int, _int, _int, _u32, _u32]  # fmt: skip
    dll.dgc_quant_decode.restype = None
    dll.dgc_quant_decode.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int, _int, _int, _int]
    return dll


_SELF_CHECK: list[Callable[[], None]] = []
"""The check against the torch reference, registered by :mod:`dgc.quant` when it is imported (this
module never imports the library: kernels sit below it)."""


def register_self_check(check: Callable[[], None]) -> None:
    """Set the check that a freshly loaded build must pass (raises RuntimeError on a mismatch)."""
    _SELF_CHECK[:] = [check]


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("DGC_CPU_KERNELS", "1") == "0":
        _notice("DGC_CPU_KERNELS=0")
        return None
    if sys.byteorder != "little":
        _notice("big-endian machine")
        return None
    try:
        dll = _load(build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _notice(str(exc))
        return None
    if not _SELF_CHECK:
        _notice("no self-check registered: import dgc.quant first")
        return None
    _LOADED.append(dll)
    try:
        _SELF_CHECK[0]()
    except RuntimeError as exc:
        _LOADED.clear()
        _notice(str(exc))
        return None
    return dll


_LOADED: list[ctypes.CDLL] = []
"""The library while the registered self-check runs (the fast path it compares needs it)."""


def _dll() -> ctypes.CDLL | None:
    return _LOADED[0] if _LOADED else _library()


def _notice(why: str) -> None:
    """The one log line of a fallback (rank 0 only, in a process group)."""
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
    (log.warning if rank0 else log.debug)(
        "dgc.kernels: compiled quantizer kernels unavailable (%s); dgc.quant uses its torch reference "
        "(about 10-40x slower)", why
    )


def is_available() -> bool:
    """True when the compiled quantizer pass is built (or builds now), loads and passes its self-check."""
    return _dll() is not None


# ---------------------------------------------------------------------------------------- the C++ calls
def _addr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _piece(width: int) -> int:
    """Elements per unit of work: whole blocks and whole bytes of codes, at least :data:`_TILE`."""
    unit = width * 8 // math.gcd(width, 8)
    return unit * max(1, -(-_TILE // unit))


def encode(grid: Grid, x: Tensor, width: int, *, scales: Tensor, codes: Tensor, scales_given: bool = False,
           residual: Tensor | None = None, residual_out: Tensor | None = None, sent: Tensor | None = None,
           key: tuple[int, int] = (0, 0)) -> None:  # fmt: skip
    """Encode ``x`` (+ ``residual``) in blocks of ``width``: fills ``scales`` (unless ``scales_given``)
    and ``codes``, and ``sent`` / ``residual_out`` when given (``residual_out`` may be ``residual``)."""
    dll = _dll()
    if dll is None:
        raise RuntimeError("quant_fused.encode: the compiled pass is unavailable (check is_available())")
    n = x.numel()
    method = METHOD_CODES[grid.method]

    def run(lo: int, hi: int) -> None:
        dll.dgc_quant_encode(x.data_ptr(), _addr(residual), _addr(residual_out), _addr(sent), scales.data_ptr(),
                             int(scales_given), codes.data_ptr(), n, width, lo, hi, method, grid.levels,
                             grid.bits, int(grid.stochastic), key[0], key[1])  # fmt: skip

    reference._over_chunks(n, run, x.device, _piece(width))


def decode(grid: Grid, codes: Tensor, scales: Tensor, out: Tensor, width: int, *, accumulate: bool = False) -> None:
    """``out`` = (or += with ``accumulate``) the values of ``out.numel()`` packed ``codes``."""
    dll = _dll()
    if dll is None:
        raise RuntimeError("quant_fused.decode: the compiled pass is unavailable (check is_available())")
    n = out.numel()
    method = METHOD_CODES[grid.method]

    def run(lo: int, hi: int) -> None:
        dll.dgc_quant_decode(codes.data_ptr(), scales.data_ptr(), out.data_ptr(), n, width, lo, hi, method,
                             grid.levels, grid.bits, int(accumulate))  # fmt: skip

    reference._over_chunks(n, run, out.device, _piece(width))
