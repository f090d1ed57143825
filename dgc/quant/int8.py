"""Linear ("8-bit fixed point") quantization: the seed lecture's scale + zero point scheme.

Symmetric variant, chosen for gradients (centred on zero, so an asymmetric range buys nothing and
0 must be exact): per block of ``chunk_size`` elements the scale is ``max |x|`` (sent as float32)
and one step is ``scale / qmax`` with ``qmax = 2**(bits-1) - 1`` (127 at 8 bits).  The code of x is
``round(x / step) + qmax``: an unsigned integer in ``[0, 2 * qmax]`` whose zero point, ``qmax``, is
fixed (so it is not sent) and maps back to exactly 0.0.  Rounding is to nearest (error at most half
a step) or stochastic (unbiased, error below one step).

``bits`` is 3..8.  Below 3 bits the grid has fewer than 2 levels of headroom on each side of zero
(``qmax < 2``: every value rounds to 0 or to the block's max) and it is refused; 2 bits is
TernGrad (:mod:`dgc.quant.terngrad`), which rounds stochastically to that ternary grid on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .blocks import round_levels
from .encoded import Encoded
from .quantizer import BlockQuantizer, NonFinite

__all__ = ["Int8Quantizer", "decode", "encode", "qmax"]


def qmax(bits: int) -> int:
    """Positive levels of a ``bits``-bit symmetric grid (127 at 8 bits)."""
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True, kw_only=True)
class Int8Quantizer(BlockQuantizer):
    """Symmetric linear quantization to ``bits`` bits (default 8) with one scale per block."""

    bits: int = 8
    """Bits per element, 3 <= bits <= 8 (at least 2 levels of headroom each side of zero)."""

    method: ClassVar[str] = "int8"

    def __post_init__(self) -> None:
        super().__post_init__()
        b = self.bits
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
            raise ValueError(f"bits = {b!r} is invalid for int8: it must be an integer from 3 to 8.")
        if qmax(b) < 2:
            raise ValueError(
                f"bits = {b} is invalid for int8: a {b}-bit symmetric grid has {qmax(b)} level(s) "
                "on each side of zero, fewer than the 2 levels of headroom linear quantization "
                "needs (every value would round to 0 or to the block's max). Use bits >= 3, or "
                "method='terngrad' for a 2-bit stochastic ternary code."
            )

    @property
    def levels(self) -> int:
        return qmax(self.bits)

    def to_codes(self, r: Tensor, key: tuple[int, int] | None) -> Tensor:
        q = self.levels
        k = round_levels(r * q, stochastic=self.stochastic, key=key).clamp_(-q, q)
        return (k + q).to(torch.uint8)

    def from_codes(self, codes: Tensor, levels: int) -> Tensor:
        return (codes.to(torch.float32) - levels) / levels


def encode(x: Tensor, *, bits: int = 8, chunk_size: int | None = None, stochastic: bool = False,
           nonfinite: NonFinite = "raise", generator: torch.Generator | None = None) -> Encoded:
    """Quantize ``x`` to ``bits``-bit codes with one float32 scale per ``chunk_size`` elements."""
    q = Int8Quantizer(bits=bits, chunk_size=chunk_size, stochastic=stochastic, nonfinite=nonfinite)
    return q.encode(x, generator=generator)


def decode(encoded: Encoded) -> Tensor:
    """float32 values of an int8 :class:`~dgc.quant.encoded.Encoded` (flat)."""
    return Int8Quantizer(bits=encoded.bits, chunk_size=encoded.chunk_size).decode(encoded)
