"""Channel (filter) pruning: prune whole output units by the L1 or L2 norm of their weights.

A pruned filter of a convolution (row of a linear weight) produces only its bias, so the
layer can be physically shrunk after training (Li et al., ICLR'17 "Pruning Filters for
Efficient ConvNets" rank filters by L1 norm). ``round(s * out_channels)`` filters of each
layer are pruned. Biases are not masked.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dgc.pruning.granularity import (
    LayerwiseGranularity,
    as_matrix,
    count_to_prune,
    group_scores_pruned_below,
    prune_lowest,
)

__all__ = ["Channel"]


@dataclass(kw_only=True, slots=True)
class Channel(LayerwiseGranularity):
    """Prune the output channels (filters) of smallest Lp norm."""

    norm: int = 1
    """1: L1 norm of a filter (Li et al.); 2: L2 norm."""

    def __post_init__(self) -> None:
        if self.norm not in (1, 2):
            raise ValueError(f"prune.granularity.norm must be 1 or 2, got {self.norm!r}")

    def layer_mask(self, weight: Tensor, sparsity: float, prev_mask: Tensor | None) -> Tensor:
        w = as_matrix(weight).detach().float()
        scores = w.norm(p=self.norm, dim=1)
        if prev_mask is not None:
            scores = group_scores_pruned_below(scores, ~as_matrix(prev_mask).any(dim=1))
        keep_rows = prune_lowest(scores, count_to_prune(sparsity, scores.numel()))
        return keep_rows.view(-1, *([1] * (weight.dim() - 1))).expand(weight.shape).contiguous()
