"""Bit packing of small unsigned codes into bytes, with torch ops only (no per-element Python loop).

``pack_bits(codes, bits)`` stores ``numel`` codes of ``bits`` bits each in ``ceil(numel * bits / 8)``
bytes, least significant bits first: for ``bits`` in {1, 2, 4, 8} ``8 // bits`` codes share a byte
(code ``i`` of a byte at bit ``i * bits``); for 3, 5, 6, 7 bits the codes form one little-endian bit
stream.  ``unpack_bits`` is its exact inverse.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["MAX_BITS", "pack_bits", "packed_bytes", "unpack_bits"]

MAX_BITS = 8
"""Widest code these functions pack (a code always fits a byte)."""

_LITTLE = sys.byteorder == "little"


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack the flat integer tensor ``codes`` (each in ``[0, 2**bits)``) into a uint8 tensor."""
    _check_bits(bits)
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    if 8 % bits == 0:
        per = 8 // bits
        grouped = _pad(codes, per).view(-1, per)
        shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
        return (grouped << shifts).sum(dim=1, dtype=torch.uint8)  # disjoint bits: sum == or
    # 8 codes -> one int64 word of 8 * bits bits; its first ``bits`` little-endian bytes
    words = (_pad(codes, 8).view(-1, 8).to(torch.int64) << _shifts(bits, codes.device)).sum(dim=1)
    return _word_bytes(words)[:, :bits].reshape(-1)[: packed_bytes(codes.numel(), bits)]


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The ``numel`` codes (uint8) that :func:`pack_bits` stored in ``packed``."""
    _check_bits(bits)
    if packed.numel() < packed_bytes(numel, bits):
        raise ValueError(f"unpack_bits: {packed.numel()} bytes cannot hold {numel} codes of {bits} "
                         f"bits ({packed_bytes(numel, bits)} needed)")
    packed = packed.reshape(-1)
    if bits == 8:
        return packed[:numel].clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
        return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:numel]
    groups = -(-numel // 8)
    if groups == 0:
        return torch.empty(0, dtype=torch.uint8, device=packed.device)
    raw = _pad(packed[: packed_bytes(numel, bits)], groups * bits).view(groups, bits)
    words = torch.zeros(groups, 8, dtype=torch.uint8, device=packed.device)
    words[:, :bits] = raw
    words = words.view(-1).view(torch.int64) if _LITTLE else _from_le(words)
    codes = (words.unsqueeze(1) >> _shifts(bits, packed.device)) & mask
    return codes.to(torch.uint8).reshape(-1)[:numel]


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(8, device=device, dtype=torch.int64) * bits


def _word_bytes(words: Tensor) -> Tensor:
    """int64 words as rows of their 8 little-endian bytes."""
    if _LITTLE:
        return words.contiguous().view(torch.uint8).view(-1, 8)
    return torch.stack([(words >> (8 * i)) & 0xFF for i in range(8)], dim=1).to(torch.uint8)


def _from_le(rows: Tensor) -> Tensor:
    """Rows of 8 little-endian bytes as int64 words (big-endian hosts)."""
    out = torch.zeros(rows.shape[0], dtype=torch.int64, device=rows.device)
    for i in range(8):
        out |= rows[:, i].to(torch.int64) << (8 * i)
    return out


def _pad(x: Tensor, multiple: int) -> Tensor:
    extra = -x.numel() % multiple
    return torch.cat([x, x.new_zeros(extra)]) if extra else x


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits = {bits!r} is invalid: codes are packed with 1 to {MAX_BITS} bits "
                         "per element.")
