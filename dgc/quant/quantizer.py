"""The shared shape of the three quantizers: per block, a float scale and integer codes of the
normalized values ``r = x / scale`` in ``[-1, 1]``.

A subclass says how a block's scale is measured (:meth:`BlockQuantizer.block_scales`: max |x| or
the L2 norm), how ``r`` becomes a code (:meth:`BlockQuantizer.to_codes`) and what a code is worth
(:meth:`BlockQuantizer.from_codes`, in units of the scale).  Everything is torch ops on whole
tensors; encode and decode are pure (no state besides the optional random generator).

Bad input:

* an all-zero block has scale 0 and sends zeros (never a NaN scale: the division is guarded);
* a non-finite element makes its block's scale non-finite: ``nonfinite="raise"`` raises
  ``FloatingPointError`` from :meth:`~BlockQuantizer.encode`; ``"propagate"`` keeps the non-finite
  scale, so that whole block decodes to NaN (what ``torch.amp.GradScaler`` looks for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from .blocks import as_blocks
from .encoded import Encoded, encoded_bytes
from .packing import pack_bits, unpack_bits

__all__ = ["NONFINITE_RULES", "BlockQuantizer", "NonFinite"]

NonFinite = Literal["raise", "propagate"]
NONFINITE_RULES: tuple[str, ...] = ("raise", "propagate")


@dataclass(frozen=True, kw_only=True)
class BlockQuantizer:
    """Base class of :class:`~dgc.quant.int8.Int8Quantizer`, :class:`~dgc.quant.terngrad.TernGrad`
    and :class:`~dgc.quant.qsgd.QSGD`."""

    chunk_size: int | None = None
    """Elements that share one scale, >= 1; None = one scale for the whole tensor."""
    stochastic: bool = False
    """Stochastic rounding (unbiased: ``E[decode(encode(x))] = x``) instead of round-to-nearest."""
    nonfinite: NonFinite = "raise"
    """A NaN/Inf input: ``"raise"`` (``FloatingPointError``) or ``"propagate"`` (its blocks decode
    to NaN)."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        c = self.chunk_size
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"chunk_size = {c!r} is invalid: it must be an integer >= 1 (elements "
                             "per scale), or None for one scale per tensor.")
        if not isinstance(self.stochastic, bool):
            raise TypeError(f"stochastic = {self.stochastic!r} must be a bool.")
        if self.nonfinite not in NONFINITE_RULES:
            raise ValueError(f"nonfinite = {self.nonfinite!r} is invalid: use one of "
                             f"{NONFINITE_RULES}.")

    # ------------------------------------------------------------------ what subclasses define
    # ``bits`` (bits per element on the wire) and ``levels`` (positive levels of the grid, the
    # largest code magnitude): a field or a property of each subclass.
    bits: ClassVar[int]
    levels: ClassVar[int]

    def block_scales(self, blocks: Tensor) -> Tensor:
        """One non-negative float per row of ``blocks`` (NaN/Inf if the row is not finite)."""
        return blocks.abs().amax(dim=1)

    def to_codes(self, r: Tensor, generator: torch.Generator | None) -> Tensor:
        """Unsigned integer codes (< 2**bits) of the normalized values ``r`` in [-1, 1]."""
        raise NotImplementedError

    def from_codes(self, codes: Tensor, levels: int) -> Tensor:
        """The float32 value of each code, in units of its block's scale."""
        raise NotImplementedError

    # ------------------------------------------------------------------ encode / decode
    def nbytes(self, numel: int) -> int:
        """Bytes of a tensor of ``numel`` elements on the wire (scales included)."""
        return encoded_bytes(numel, self.bits, self.chunk_size)

    def encode(self, x: Tensor, *, generator: torch.Generator | None = None) -> Encoded:
        """Quantize ``x`` (any shape, any float dtype; computed in float32)."""
        flat = x.detach().reshape(-1).to(torch.float32)
        blocks = as_blocks(flat, self.chunk_size)
        scales = self.block_scales(blocks).to(torch.float32)
        usable = torch.isfinite(scales) & (scales > 0)
        if self.nonfinite == "raise" and not bool(torch.isfinite(scales).all()):
            raise FloatingPointError(
                f"{self.method}: non-finite input ({int((~torch.isfinite(flat)).sum())} of "
                f"{flat.numel()} elements are NaN/Inf). Fix the gradient (lower the learning rate, "
                "clip), or use nonfinite='propagate' to hand NaN on to torch.amp.GradScaler."
            )
        r = blocks / torch.where(usable, scales, torch.ones_like(scales)).unsqueeze(1)
        r = torch.where(usable.unsqueeze(1), r, torch.zeros_like(r)).clamp_(-1.0, 1.0)
        codes = self.to_codes(r, generator).reshape(-1)[: flat.numel()]
        return Encoded(codes=pack_bits(codes, self.bits), scales=scales, numel=flat.numel(),
                       bits=self.bits, levels=self.levels, chunk_size=self.chunk_size)

    def decode(self, encoded: Encoded) -> Tensor:
        """The float32 values of ``encoded`` (flat, ``encoded.numel`` long)."""
        return decode(encoded, self.from_codes)

    def from_bytes(self, buf: Tensor, numel: int) -> Encoded:
        """An :class:`Encoded` read back from the bytes of :meth:`Encoded.to_bytes`."""
        return Encoded.from_bytes(buf, numel=numel, bits=self.bits, levels=self.levels,
                                  chunk_size=self.chunk_size)


def decode(encoded: Encoded, from_codes) -> Tensor:
    """Codes times their block's scale (a non-finite scale gives NaN for its whole block)."""
    codes = unpack_bits(encoded.codes, encoded.bits, encoded.numel)
    units = from_codes(codes, encoded.levels)
    n = encoded.numel
    padded = as_blocks(units, encoded.chunk_size)
    scales = encoded.scales.to(torch.float32)
    bad = ~torch.isfinite(scales)
    scales = torch.where(bad, torch.full_like(scales, float("nan")), scales)
    return (padded * scales.unsqueeze(1)).reshape(-1)[:n]
