"""Blocks of elements that share one scale (``chunk_size``), their scales, and the rounding to
integer levels (to nearest, or stochastic with counter-based random draws)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["as_blocks", "block_width", "draw_key", "num_blocks", "round_levels", "scales_of",
           "uniform"]


def num_blocks(numel: int, chunk_size: int | None) -> int:
    """Blocks (scales) of a tensor of ``numel`` elements; ``chunk_size=None``: one per tensor."""
    if chunk_size is None or numel == 0:
        return 1
    return -(-numel // chunk_size)


def block_width(numel: int, chunk_size: int | None) -> int:
    """Elements per block: ``ceil(numel / num_blocks)`` (at most ``chunk_size``; the last block
    may be shorter)."""
    return max(1, -(-numel // num_blocks(numel, chunk_size)))


def as_blocks(flat: Tensor, chunk_size: int | None) -> Tensor:
    """``flat`` as a ``(num_blocks, block)`` matrix, zero-padded at the end (zeros change no
    block's max or norm)."""
    n = flat.numel()
    blocks = num_blocks(n, chunk_size)
    width = block_width(n, chunk_size)
    extra = blocks * width - n
    if extra:
        flat = torch.cat([flat, flat.new_zeros(extra)])
    return flat.view(blocks, width)


def scales_of(flat: Tensor, chunk_size: int | None, measure: Callable[[Tensor], Tensor]) -> Tensor:
    """``measure`` (a row-wise reduction: max |x| or the L2 norm) of every block of ``flat``, as
    float32, without padding the whole tensor: the full blocks as one matrix, the short last
    block (zero-padded) as another.  The fast path calls this same function, so both get the
    same bits."""
    n = flat.numel()
    width = block_width(n, chunk_size)
    full = n // width
    parts = []
    if full:
        parts.append(measure(flat[: full * width].view(full, width)))
    if full * width < n or n == 0:
        tail = flat.new_zeros(width)
        tail[: n - full * width] = flat[full * width :]
        parts.append(measure(tail.view(1, width)))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.to(torch.float32)


# ------------------------------------------------------------------------------ random draws
_MASK32 = 0xFFFF_FFFF


def draw_key(generator: torch.Generator | None) -> tuple[int, int]:
    """Two 32-bit words keying one encode call's random stream, drawn from ``generator`` (the
    global generator when None), so the same seed gives the same stream on any path."""
    device = generator.device if generator is not None else "cpu"
    word = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    return word & _MASK32, (word >> 32) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """Two multiply-xorshift rounds on int64 holding 32-bit values (constants below 2**31, so the
    products fit int64); kernels/quant_fused.cpp's ``hash32``."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x31848BAB) & _MASK32
    return x ^ (x >> 16)


def uniform(key: tuple[int, int], count: int, device: torch.device | str = "cpu") -> Tensor:
    """``count`` float32 draws in ``[0, 1)`` (multiples of 2**-24), one per element index: a
    counter-based stream, the same whatever order or thread computes element ``i``."""
    i = torch.arange(count, dtype=torch.int64, device=device)
    h = _hash32((i & _MASK32) ^ key[0])
    h = _hash32(h ^ key[1] ^ (i >> 32))
    return (h >> 8).to(torch.float32) * 2.0**-24


def round_levels(r: Tensor, *, stochastic: bool, key: tuple[int, int] | None) -> Tensor:
    """``r`` rounded to integers: to nearest (half to even), or stochastically
    (``floor(r + u)``, ``u ~ U[0, 1)`` drawn by :func:`uniform` for element ``i`` of ``r``
    flattened, so ``E[result] = r``: the papers' unbiased rounding)."""
    if not stochastic:
        return torch.round(r)
    if key is None:
        raise ValueError("round_levels: stochastic rounding needs a key (see draw_key)")
    u = uniform(key, r.numel(), r.device).view(r.shape)
    return torch.floor(r + u)
