"""``topk_select``: the selection primitive of DGC, on its own."""

from __future__ import annotations

import random
from typing import NamedTuple

from torch import Tensor

from .kernels import Backend, backend_for

__all__ = ["Selection", "topk_select"]


class Selection(NamedTuple):
    """The ``k`` entries of largest magnitude: unpacks as ``indices, values = topk_select(...)``."""

    indices: Tensor
    """int64 positions in the flattened input, ascending."""
    values: Tensor
    """The input's (signed) values at ``indices``."""


def topk_select(
    x: Tensor,
    k: int,
    sample_ratio: float = 0.01,
    *,
    offset: int | None = None,
    backend: Backend = "auto",
) -> Selection:
    """Exactly ``k`` entries of largest ``|x|`` (ties go to the lowest index), found with a sampled
    threshold.

    The threshold comes from a strided sample of ``sample_ratio`` of the entries starting at a random
    ``offset``; while fewer than ``k`` entries pass it, it is lowered by 0.8, at most 10 times
    (docs/algorithm.md#selection), then an exact threshold is used.  Since the candidates passing the threshold always include the top-k,
    the result is the exact top-k; ``sample_ratio=1`` skips the sample.
    """
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio = {sample_ratio!r} must satisfy 0 < sample_ratio <= 1 (1 = exact)")
    n = x.numel()
    if not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k = {k!r} must be an integer in [0, x.numel()={n}]")
    if not x.is_floating_point():
        raise TypeError(f"topk_select needs a floating-point tensor, got {x.dtype}")
    flat = x.detach().reshape(-1)
    if offset is None:
        offset = random.randrange(max(1, round(1.0 / sample_ratio)))
    kernels = backend_for(flat.device, backend)
    # Both backends rank float16/bfloat16/float32/float64 magnitudes in their own dtype (exactly): no copy.
    indices = kernels.select_topk(flat, k, sample_ratio=sample_ratio, offset=offset)
    return Selection(indices, flat.index_select(0, indices))
