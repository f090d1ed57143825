"""The shared shape of the three quantizers: per block, a float scale and integer codes of the
normalized values ``r = x / scale`` in ``[-1, 1]``.

A subclass says how a block's scale is measured (:meth:`BlockQuantizer.block_scales`: max |x| or
the L2 norm), how ``r`` becomes a code (:meth:`BlockQuantizer.to_codes`) and what a code is worth
(:meth:`BlockQuantizer.from_codes`, in units of the scale).  The reference is torch ops on whole
tensors (:meth:`BlockQuantizer.encode_reference`, :func:`decode`); on a CPU the compiled pass of
:mod:`dgc.kernels.quant_fused` computes the same bits in one sweep (:mod:`dgc.quant.fused`).  Encode
and decode are pure (no state besides the optional random generator).

Bad input:

* an all-zero block has scale 0 and sends zeros (never a NaN scale: the division is guarded);
* a non-finite element makes its block's scale non-finite: ``nonfinite="raise"`` raises
  ``FloatingPointError`` from :meth:`~BlockQuantizer.encode`; ``"propagate"`` keeps the non-finite
  scale, so that whole block decodes to NaN (what ``torch.amp.GradScaler`` looks for).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from .blocks import as_blocks, draw_key, scales_of
from .encoded import Encoded, encoded_bytes
from .packing import pack_bits, unpack_bits

__all__ = ["BACKENDS", "NONFINITE_RULES", "Backend", "BlockQuantizer", "NonFinite", "use_fused"]

NonFinite = Literal["raise", "propagate"]
NONFINITE_RULES: tuple[str, ...] = ("raise", "propagate")
Backend = Literal["auto", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "torch")


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

    def to_codes(self, r: Tensor, key: tuple[int, int] | None) -> Tensor:
        """Unsigned integer codes (< 2**bits) of the normalized values ``r`` in [-1, 1] (``key``:
        the call's random stream, :func:`dgc.quant.blocks.round_levels`; None when deterministic)."""
        raise NotImplementedError

    def from_codes(self, codes: Tensor, levels: int) -> Tensor:
        """The float32 value of each code, in units of its block's scale."""
        raise NotImplementedError

    # ------------------------------------------------------------------ encode / decode
    def nbytes(self, numel: int) -> int:
        """Bytes of a tensor of ``numel`` elements on the wire (scales included)."""
        return encoded_bytes(numel, self.bits, self.chunk_size)

    def encode(self, x: Tensor, *, generator: torch.Generator | None = None, out: Tensor | None = None,
               backend: Backend = "auto") -> Encoded:
        """Quantize ``x`` (any shape, any float dtype; computed in float32).

        ``out``: a uint8 tensor of :meth:`nbytes` bytes to write the message into (then
        ``to_bytes()`` costs nothing).  ``backend``: ``"auto"`` runs the compiled CPU pass where it
        is available (the same bits), ``"torch"`` the torch reference.  Stochastic rounding draws
        one key from ``generator`` (the global generator when None) per call.
        """
        flat = x.detach().reshape(-1).to(torch.float32)
        key = draw_key(generator) if self.stochastic else None
        if use_fused(backend, flat):
            from .fused import fused_encode

            return fused_encode(self, flat, key=key, out=out).encoded
        return self.encode_reference(flat, key=key, out=out)

    def encode_reference(self, flat: Tensor, *, key: tuple[int, int] | None,
                         out: Tensor | None = None) -> Encoded:
        """:meth:`encode` in plain torch ops on whole tensors (the reference of the fast path)."""
        scales = self.scales(flat)
        self.check_finite(scales, lambda: flat)
        blocks = as_blocks(flat, self.chunk_size)
        usable = torch.isfinite(scales) & (scales > 0)
        r = blocks / torch.where(usable, scales, torch.ones_like(scales)).unsqueeze(1)
        r = torch.where(usable.unsqueeze(1), r, torch.zeros_like(r)).clamp_(-1.0, 1.0)
        codes = self.to_codes(r, key).reshape(-1)[: flat.numel()]
        encoded = Encoded(codes=pack_bits(codes, self.bits), scales=scales, numel=flat.numel(),
                          bits=self.bits, levels=self.levels, chunk_size=self.chunk_size)
        return encoded if out is None else encoded.into(out)

    def scales(self, flat: Tensor) -> Tensor:
        """float32 scale of every block of the flat float32 tensor ``flat``."""
        return scales_of(flat, self.chunk_size, self.block_scales)

    def check_finite(self, scales: Tensor, flat: Callable[[], Tensor]) -> None:
        """``nonfinite="raise"``: ``FloatingPointError`` when a scale is not finite (``flat()``:
        the input, only computed to count its bad elements for the message)."""
        if self.nonfinite == "raise" and not bool(torch.isfinite(scales).all()):
            values = flat()
            raise FloatingPointError(
                f"{self.method}: non-finite input ({int((~torch.isfinite(values)).sum())} of "
                f"{values.numel()} elements are NaN/Inf). Fix the gradient (lower the learning "
                "rate, clip), or use nonfinite='propagate' to hand NaN on to torch.amp.GradScaler."
            )

    def decode(self, encoded: Encoded, *, out: Tensor | None = None,
               backend: Backend = "auto") -> Tensor:
        """The float32 values of ``encoded`` (flat, ``encoded.numel`` long; into ``out`` when
        given, a float32 tensor of that many elements)."""
        if use_fused(backend, encoded.codes):
            from .fused import fused_decode

            return fused_decode(self, encoded, out=out)
        values = decode(encoded, self.from_codes)
        return values if out is None else out.view(-1).copy_(values)

    def from_bytes(self, buf: Tensor, numel: int) -> Encoded:
        """An :class:`Encoded` read back from the bytes of :meth:`Encoded.to_bytes`."""
        return Encoded.from_bytes(buf, numel=numel, bits=self.bits, levels=self.levels,
                                  chunk_size=self.chunk_size)


def use_fused(backend: Backend, t: Tensor) -> bool:
    """Whether :func:`dgc.quant.fused` serves a tensor (``backend="auto"``, on a CPU, compiled)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r} is invalid: use one of {BACKENDS}.")
    if backend == "torch" or t.device.type != "cpu":
        return False
    from dgc.kernels import quant_fused

    return quant_fused.is_available()


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
