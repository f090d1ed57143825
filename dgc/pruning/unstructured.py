"""Unstructured magnitude pruning: prune the individual weights of smallest ``|w|``.

``scope="layer"`` prunes the same fraction of every layer (Han et al. 2015); ``scope="global"``
ranks the weights of all pruned layers together, so layers with many small weights (usually
the large fully connected ones) end up sparser than sensitive small layers (the rule of
``torch.nn.utils.prune.global_unstructured``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dgc.pruning.granularity import (
    LayerwiseGranularity,
    count_to_prune,
    element_scores,
    prune_lowest,
)

__all__ = ["Unstructured"]


@dataclass(kw_only=True, slots=True)
class Unstructured(LayerwiseGranularity):
    """Element-wise magnitude pruning."""

    scope: Literal["layer", "global"] = "layer"
    """``"layer"``: every layer pruned to the target sparsity; ``"global"``: the target applies
    to all pruned weights together (one magnitude ranking across layers)."""

    def __post_init__(self) -> None:
        if self.scope not in ("layer", "global"):
            raise ValueError(
                f"prune.granularity.scope must be 'layer' or 'global', got {self.scope!r}"
            )

    def layer_mask(self, weight: Tensor, sparsity: float, prev_mask: Tensor | None) -> Tensor:
        scores = element_scores(weight, prev_mask)
        return prune_lowest(scores, count_to_prune(sparsity, scores.numel()))

    def reachable_sparsity(self, weight: Tensor, sparsity: float) -> float | None:
        if self.scope == "global":  # per layer it depends on the other layers by design
            return None
        return LayerwiseGranularity.reachable_sparsity(self, weight, sparsity)

    def compute_masks(
        self,
        weights: Mapping[str, Tensor],
        sparsity: float,
        prev_masks: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        if self.scope == "layer":
            return LayerwiseGranularity.compute_masks(self, weights, sparsity, prev_masks)
        # One ranking over all layers, concatenated in the model's order (ties by that order).
        prev_masks = prev_masks or {}
        names = list(weights)
        if not names:
            return {}
        device = next(iter(weights.values())).device
        scores = [element_scores(weights[n], prev_masks.get(n)).to(device) for n in names]
        flat = torch.cat([s.reshape(-1) for s in scores])
        keep = prune_lowest(flat, count_to_prune(sparsity, flat.numel()))
        masks: dict[str, Tensor] = {}
        for name, part in zip(names, torch.split(keep, [s.numel() for s in scores]), strict=True):
            masks[name] = part.view(weights[name].shape).to(weights[name].device)
        return masks
