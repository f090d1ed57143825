"""What a quantizer produces: packed codes plus one float scale per block, and its byte layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import num_blocks
from .packing import packed_bytes

__all__ = ["Encoded", "encoded_bytes"]


def encoded_bytes(numel: int, bits: int, chunk_size: int | None) -> int:
    """Bytes of :meth:`Encoded.to_bytes` for a tensor of ``numel`` elements: float32 scales, then
    codes, padded to a multiple of 4 (so consecutive messages keep their scales aligned)."""
    raw = 4 * num_blocks(numel, chunk_size) + packed_bytes(numel, bits)
    return -(-raw // 4) * 4


@dataclass(frozen=True, slots=True)
class Encoded:
    """A quantized tensor: fixed size for a given ``numel``, ``bits`` and ``chunk_size``."""

    codes: Tensor
    """uint8, ``ceil(numel * bits / 8)`` bytes of packed codes (see :mod:`dgc.quant.packing`)."""
    scales: Tensor
    """float32, one per block of ``chunk_size`` elements (one per tensor when None); NaN/Inf only
    where the input was non-finite and ``nonfinite="propagate"``."""
    numel: int
    """Elements encoded."""
    bits: int
    """Bits per element in ``codes``."""
    levels: int
    """Positive levels of the grid (int8: ``2**(bits-1) - 1``, TernGrad: 1, QSGD: ``s``)."""
    chunk_size: int | None
    """Elements per scale (None = one scale for the whole tensor)."""
    message: Tensor | None = None
    """The :meth:`to_bytes` layout when ``codes`` and ``scales`` are views into it (what the fast
    encoder and ``encode(out=...)`` produce); None otherwise."""

    @property
    def nbytes(self) -> int:
        """Bytes this tensor takes on the wire (:meth:`to_bytes`)."""
        return encoded_bytes(self.numel, self.bits, self.chunk_size)

    def to_bytes(self, out: Tensor | None = None) -> Tensor:
        """Serialize into ``out`` (uint8, :attr:`nbytes` long; allocated when None).  An encoding
        that already holds its message returns it (``out`` None, or ``out`` that very buffer):
        no copy, and the result shares memory with :attr:`codes`."""
        m = self.message
        if m is not None and (out is None or (out.data_ptr() == m.data_ptr()
                                              and out.numel() == m.numel())):
            return m
        if out is None:
            out = torch.zeros(self.nbytes, dtype=torch.uint8, device=self.codes.device)
        s = 4 * self.scales.numel()
        out[:s] = self.scales.to(torch.float32).contiguous().view(torch.uint8)
        out[s : s + self.codes.numel()] = self.codes
        out[s + self.codes.numel() :] = 0
        return out

    def into(self, out: Tensor) -> Encoded:
        """This encoding serialized into ``out``, as an :class:`Encoded` whose codes and scales are
        views into it (when ``out`` is 4-byte aligned; else copies)."""
        self.to_bytes(out)
        s = 4 * self.scales.numel()
        aligned = out.data_ptr() % 4 == 0
        scales = out[:s].view(torch.float32) if aligned else self.scales
        return Encoded(codes=out[s : s + self.codes.numel()], scales=scales, numel=self.numel,
                       bits=self.bits, levels=self.levels, chunk_size=self.chunk_size,
                       message=out[: self.nbytes])

    @classmethod
    def from_bytes(cls, buf: Tensor, *, numel: int, bits: int, levels: int,
                   chunk_size: int | None) -> Encoded:
        """The inverse of :meth:`to_bytes` (``buf`` may be a view into a larger message)."""
        blocks = num_blocks(numel, chunk_size)
        s = 4 * blocks
        scales = buf[:s].clone().view(torch.float32)
        codes = buf[s : s + packed_bytes(numel, bits)]
        return cls(codes=codes, scales=scales, numel=numel, bits=bits, levels=levels,
                   chunk_size=chunk_size)
