"""QSGD (Alistarh et al., NeurIPS 2017): ``s`` levels of ``|g| / ||g||``, stochastic rounding.

Per block of ``chunk_size`` elements (the paper's "bucket size" d; None = the whole tensor) the
scale is the L2 norm ``||g||``.  Each element is sent as ``||g|| * sign(g) * l / s`` where
``l = floor(s |g| / ||g|| + u)``, ``u ~ U[0, 1)`` (``stochastic=True``: the paper's unbiased
estimator, variance at most ``min(d / s**2, sqrt(d) / s) ||g||**2``), or rounded to nearest
(``stochastic=False``, for use with error feedback).  The code is ``l << 1 | sign``: one sign bit
and ``bit_length(s)`` level bits, packed at fixed width (the paper's Elias coding of the levels is
variable-length; fixed width keeps every message the same size).  ``s = 1`` is 2 bits per element,
``s = 7`` 4 bits, ``s = 127`` 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .blocks import round_levels
from .encoded import Encoded
from .quantizer import BlockQuantizer, NonFinite

__all__ = ["MAX_LEVELS", "QSGD", "decode", "encode", "qsgd_bits"]

MAX_LEVELS = 127
"""Largest ``s``: sign and level fit one byte."""


def qsgd_bits(levels: int) -> int:
    """Bits per element of QSGD with ``levels`` levels: a sign bit plus ``bit_length(levels)``."""
    return 1 + int(levels).bit_length()


@dataclass(frozen=True, kw_only=True)
class QSGD(BlockQuantizer):
    """QSGD with ``levels`` (the paper's s) levels per sign and one L2 norm per block."""

    levels: int = 7
    """Levels s of ``|g| / ||g||`` per sign, 1 <= s <= 127 (bits per element: 1 + bit_length(s))."""
    stochastic: bool = True
    """Stochastic rounding (the paper's unbiased estimator); False rounds to nearest."""

    method: ClassVar[str] = "qsgd"

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.levels
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_LEVELS:
            raise ValueError(f"levels = {s!r} is invalid for qsgd: it must be an integer from 1 to "
                             f"{MAX_LEVELS} (sign + level in at most 8 bits).")

    @property
    def bits(self) -> int:  # type: ignore[override]
        return qsgd_bits(self.levels)

    def block_scales(self, blocks: Tensor) -> Tensor:
        return torch.linalg.vector_norm(blocks, dim=1)

    def to_codes(self, r: Tensor, key: tuple[int, int] | None) -> Tensor:
        s = self.levels
        level = round_levels(r.abs() * s, stochastic=self.stochastic, key=key)
        level = level.clamp_(0, s).to(torch.uint8)
        return (level << 1) | (r < 0).to(torch.uint8)

    def from_codes(self, codes: Tensor, levels: int) -> Tensor:
        level = (codes >> 1).to(torch.float32) / levels
        return torch.where((codes & 1).bool(), -level, level)


def encode(x: Tensor, *, levels: int = 7, chunk_size: int | None = None, stochastic: bool = True,
           nonfinite: NonFinite = "raise", generator: torch.Generator | None = None) -> Encoded:
    """QSGD codes of ``x``: sign + level per element plus one float32 norm per block."""
    q = QSGD(levels=levels, chunk_size=chunk_size, stochastic=stochastic, nonfinite=nonfinite)
    return q.encode(x, generator=generator)


def decode(encoded: Encoded) -> Tensor:
    """float32 values of a QSGD :class:`~dgc.quant.encoded.Encoded` (flat)."""
    return QSGD(levels=encoded.levels, chunk_size=encoded.chunk_size).decode(encoded)
