"""TernGrad (Wen et al., NeurIPS 2017): ternary gradients ``{-s, 0, +s}``, 2 bits per element.

Per block (the paper: per layer; here ``chunk_size`` elements, None = the whole tensor) the scale
is ``s = max |g|``.  Each element becomes ``s * sign(g) * b`` with ``b ~ Bernoulli(|g| / s)``
(``stochastic=True``, the paper's unbiased estimator: ``E[sent] = g``), or ``b = [|g| >= s/2]``
(``stochastic=False``, round to nearest: biased, meant for use with error feedback).  Codes:
0 -> 0, 1 -> +s, 2 -> -s; four per byte.  The paper's optional gradient clipping (to 2.5 sigma)
is not applied: error feedback keeps what the ternary grid loses instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .blocks import round_levels
from .encoded import Encoded
from .quantizer import BlockQuantizer, NonFinite

__all__ = ["TernGrad", "decode", "encode"]

_VALUES = (0.0, 1.0, -1.0, 0.0)  # code -> value in units of s (code 3 is never written)


@dataclass(frozen=True, kw_only=True)
class TernGrad(BlockQuantizer):
    """Stochastic ternary quantization with one scale (max |g|) per block."""

    stochastic: bool = True
    """Bernoulli rounding (the paper's unbiased estimator); False rounds to nearest."""

    method: ClassVar[str] = "terngrad"
    bits: ClassVar[int] = 2
    levels: ClassVar[int] = 1

    def to_codes(self, r: Tensor, key: tuple[int, int] | None) -> Tensor:
        b = round_levels(r.abs(), stochastic=self.stochastic, key=key)
        return torch.where(b > 0, torch.where(r < 0, 2, 1), 0).to(torch.uint8)

    def from_codes(self, codes: Tensor, levels: int) -> Tensor:
        table = torch.tensor(_VALUES, dtype=torch.float32, device=codes.device)
        return table[codes.long()]


def encode(x: Tensor, *, chunk_size: int | None = None, stochastic: bool = True,
           nonfinite: NonFinite = "raise", generator: torch.Generator | None = None) -> Encoded:
    """TernGrad codes of ``x``: 2 bits per element plus one float32 scale per block."""
    q = TernGrad(chunk_size=chunk_size, stochastic=stochastic, nonfinite=nonfinite)
    return q.encode(x, generator=generator)


def decode(encoded: Encoded) -> Tensor:
    """float32 values of a TernGrad :class:`~dgc.quant.encoded.Encoded` (flat)."""
    return TernGrad(chunk_size=encoded.chunk_size).decode(encoded)
