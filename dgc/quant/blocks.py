"""Blocks of elements that share one scale (``chunk_size``), and the rounding to integer levels."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["as_blocks", "num_blocks", "round_levels"]


def num_blocks(numel: int, chunk_size: int | None) -> int:
    """Blocks (scales) of a tensor of ``numel`` elements; ``chunk_size=None``: one per tensor."""
    if chunk_size is None or numel == 0:
        return 1
    return -(-numel // chunk_size)


def as_blocks(flat: Tensor, chunk_size: int | None) -> Tensor:
    """``flat`` as a ``(num_blocks, block)`` matrix, zero-padded at the end (zeros change no
    block's max or norm)."""
    n = flat.numel()
    blocks = num_blocks(n, chunk_size)
    width = max(1, -(-n // blocks))
    extra = blocks * width - n
    if extra:
        flat = torch.cat([flat, flat.new_zeros(extra)])
    return flat.view(blocks, width)


def round_levels(r: Tensor, *, stochastic: bool, generator: torch.Generator | None) -> Tensor:
    """``r`` rounded to integers: to nearest, or stochastically (``floor(r + u)``, ``u ~ U[0, 1)``,
    so ``E[result] = r``: the papers' unbiased rounding)."""
    if not stochastic:
        return torch.round(r)
    u = torch.rand(r.shape, generator=generator, device=r.device, dtype=r.dtype)
    return torch.floor(r + u)
