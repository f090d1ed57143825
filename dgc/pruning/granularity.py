"""The interface every pruning granularity implements, and the selection rule they share.

A granularity turns weights and a target sparsity into boolean keep-masks (``True`` = keep).
Every granularity follows the same three rules, so masks are reproducible and identical on
every rank that holds the same weights:

1. **Scores are magnitudes of the currently kept weights.** Entries (or groups) that the
   previous mask already pruned score ``-1``, below every real magnitude, so a pruned entry
   is never revived while the sparsity grows (AGP, Zhu & Gupta 2017), and recomputing a mask
   at the sparsity it already has returns the same mask.
2. **Ties are broken by index order**: scores are sorted with a *stable* sort, so among equal
   scores the entry with the lower flat index is pruned first. No ``kthvalue``/threshold
   comparisons, whose tie handling depends on the device and the number of equal values.
3. **Counts are rounded to nearest**: pruning a fraction ``s`` of ``n`` units prunes
   ``round(s * n)`` of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "REACH_TOLERANCE",
    "Granularity",
    "LayerwiseGranularity",
    "as_matrix",
    "count_to_prune",
    "group_scores_pruned_below",
    "prune_lowest",
]

#: Score given to units the previous mask already pruned: below every magnitude (>= 0).
PRUNED_SCORE = -1.0
#: A layer whose structure keeps it further than this from the final target sparsity (half a
#: percentage point) is logged as a warning when the ``Pruner`` is built.
REACH_TOLERANCE = 0.005


def count_to_prune(sparsity: float, n: int) -> int:
    """Number of units to prune so that a fraction ``sparsity`` of ``n`` units is pruned."""
    return min(n, max(0, round(sparsity * n)))


def prune_lowest(scores: Tensor, n_prune: int) -> Tensor:
    """Keep-mask over the flat ``scores`` that prunes the ``n_prune`` lowest, ties by index.

    ``torch.sort(stable=True)`` keeps equal scores in index order, so the choice among ties
    is the same on every device and every rank.
    """
    flat = scores.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_prune > 0:
        order = torch.sort(flat, stable=True).indices
        keep[order[:n_prune]] = False
    return keep.view(scores.shape)


def prune_lowest_per_row(scores: Tensor, n_prune: int) -> Tensor:
    """Keep-mask over a 2-D ``scores`` that prunes the ``n_prune`` lowest of every row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        order = torch.sort(scores, dim=1, stable=True).indices
        keep.scatter_(1, order[:, :n_prune], False)
    return keep


def as_matrix(weight: Tensor) -> Tensor:
    """View a weight as ``(out_features, fan_in)``: rows are output units (filters)."""
    if weight.dim() < 2:
        raise ValueError(
            f"pruning needs a weight with at least 2 dimensions, got shape {tuple(weight.shape)}; "
            "exclude 1-D parameters (biases, norms) from pruning"
        )
    return weight.reshape(weight.shape[0], -1)


def element_scores(weight: Tensor, prev_mask: Tensor | None) -> Tensor:
    """``|w|`` in float32, with entries the previous mask pruned set to ``PRUNED_SCORE``."""
    scores = weight.detach().abs().float()
    if prev_mask is not None:
        scores = scores.masked_fill(~prev_mask, PRUNED_SCORE)
    return scores


def group_scores_pruned_below(scores: Tensor, all_pruned: Tensor) -> Tensor:
    """Give groups that the previous mask pruned entirely the score ``PRUNED_SCORE``."""
    return scores.masked_fill(all_pruned, PRUNED_SCORE)


class Granularity(ABC):
    """Turns weights into keep-masks at a target sparsity (fraction of entries set to zero)."""

    @abstractmethod
    def compute_masks(
        self,
        weights: Mapping[str, Tensor],
        sparsity: float,
        prev_masks: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Return one bool keep-mask per weight, shaped like the weight.

        Args:
            weights: parameter name -> weight (any float dtype, any device), in a fixed order
                (the model's order); the order matters only for global granularities.
            sparsity: target fraction of entries to prune, in [0, 1].
            prev_masks: the masks currently applied (same keys), or None when nothing is
                pruned yet. Already pruned units stay pruned.
        """

    def check(self, name: str, weight: Tensor) -> None:  # noqa: B027 - optional override
        """Raise ``ValueError`` if this granularity cannot prune ``weight`` (called at setup)."""

    @property
    def fixed_sparsity(self) -> float | None:
        """The only final sparsity this granularity supports (N:M), or None if any works."""
        return None

    def reachable_sparsity(self, weight: Tensor, sparsity: float) -> float | None:
        """The sparsity ``weight`` gets when this granularity is asked for ``sparsity``.

        Structure may not allow the target exactly (whole tiles, channels, banks). None when
        it depends on the other layers (global ranking); the ``Pruner`` warns at setup about
        layers that miss the final target by more than ``REACH_TOLERANCE``.
        """
        return None


class LayerwiseGranularity(Granularity):
    """A granularity whose mask for one layer depends on that layer alone."""

    @abstractmethod
    def layer_mask(self, weight: Tensor, sparsity: float, prev_mask: Tensor | None) -> Tensor:
        """Bool keep-mask for one weight at ``sparsity`` (see ``Granularity.compute_masks``)."""

    def reachable_sparsity(self, weight: Tensor, sparsity: float) -> float | None:
        # The mask itself, from scratch: exact for every layer-wise rule.
        return 1.0 - self.layer_mask(weight.detach(), sparsity, None).float().mean().item()

    def compute_masks(
        self,
        weights: Mapping[str, Tensor],
        sparsity: float,
        prev_masks: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        prev_masks = prev_masks or {}
        return {
            name: self.layer_mask(w, sparsity, prev_masks.get(name)) for name, w in weights.items()
        }
