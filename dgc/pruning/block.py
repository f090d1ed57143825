"""Block pruning: prune whole ``bh x bw`` tiles of the weight matrix (Narang et al. 2017).

The weight is viewed as ``(out, fan_in)``; each tile is scored by the mean ``|w|`` of its
entries and tiles are pruned lowest score first. Tiles at the right/bottom edge may be
smaller when the dimensions are not multiples of the block shape; they are scored by the mean
over their real entries, and the count of pruned tiles is chosen in *entries*: the shortest
run of lowest-scoring tiles that prunes at least ``s * numel - tile / 2`` entries, so the
layer lands within half a full tile of the target (``round(s * n_blocks)`` tiles when every
tile is full, halves rounded down). Tiles already pruned stay pruned. Dense tiles map onto block-sparse kernels
(e.g. BSR matmul) without index overhead inside a tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dgc.pruning.granularity import (
    LayerwiseGranularity,
    as_matrix,
    group_scores_pruned_below,
    prune_lowest,
)

__all__ = ["Block"]


@dataclass(kw_only=True, slots=True)
class Block(LayerwiseGranularity):
    """Prune ``block_shape`` tiles of the ``(out, fan_in)`` weight matrix by mean ``|w|``."""

    block_shape: tuple[int, int] = (4, 4)
    """(rows, columns) of one tile, in entries of the ``(out, fan_in)`` view; (1, 4) prunes
    runs of 4 inputs of one output unit."""

    def __post_init__(self) -> None:
        shape = tuple(self.block_shape)
        if len(shape) != 2 or not all(isinstance(b, int) and b >= 1 for b in shape):
            raise ValueError(
                f"prune.granularity.block_shape must be two positive ints, got {self.block_shape!r}"
            )
        self.block_shape = (shape[0], shape[1])

    def layer_mask(self, weight: Tensor, sparsity: float, prev_mask: Tensor | None) -> Tensor:
        bh, bw = self.block_shape
        w = as_matrix(weight).detach().abs().float()
        rows, cols = w.shape
        pad_r, pad_c = -rows % bh, -cols % bw
        nbr, nbc = (rows + pad_r) // bh, (cols + pad_c) // bw

        def tiles(t: Tensor) -> Tensor:  # (rows, cols) -> (nbr, nbc) sums per tile
            t = F.pad(t, (0, pad_c, 0, pad_r))
            return t.view(nbr, bh, nbc, bw).sum(dim=(1, 3))

        sizes = tiles(torch.ones_like(w))  # real entries per tile (edge tiles are smaller)
        scores = tiles(w) / sizes  # mean |w| over the real entries of each tile
        n_prev = 0
        if prev_mask is not None:
            pruned_before = tiles(as_matrix(prev_mask).float()) == 0
            scores = group_scores_pruned_below(scores, pruned_before)
            n_prev = int(pruned_before.sum())
        order = torch.sort(scores.reshape(-1), stable=True).indices
        pruned_entries = sizes.reshape(-1)[order].cumsum(0)  # after pruning the first i+1 tiles
        # The shortest prefix reaching s*numel - tile/2 (never shorter than what is already
        # pruned): within half a full tile of the target, and the same prefix when recomputed.
        reach = sparsity * w.numel() - bh * bw / 2
        n_prune = max(n_prev, int((pruned_entries < reach).sum()) + int(reach > 0))
        keep_tiles = prune_lowest(scores, min(n_prune, scores.numel()))
        keep = keep_tiles.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]
        return keep.reshape(weight.shape)
