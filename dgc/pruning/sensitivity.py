"""Per-layer pruning sensitivity: accuracy when one layer alone is pruned (Han et al. 2015).

For every prunable layer and every sparsity, a copy of the trained model has only that layer
pruned (no fine-tuning) and is evaluated. Layers whose accuracy collapses early deserve a
lower sparsity (or exclusion); the curves are the seed's VGG-16 sensitivity slide.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dgc.pruning.granularity import Granularity
from dgc.pruning.pruner import DEFAULT_PRUNABLE, unwrap_model
from dgc.pruning.unstructured import Unstructured

__all__ = ["SensitivityResult", "layer_sensitivity"]

DEFAULT_SPARSITIES: tuple[float, ...] = tuple(i / 20 for i in range(20))  # 0, 0.05, ..., 0.95


@dataclass(kw_only=True, slots=True)
class SensitivityResult:
    """Accuracy per (layer, sparsity), and the unpruned baseline."""

    sparsities: list[float]
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    """Layer parameter name -> metric at each of ``sparsities`` (that layer alone pruned)."""
    baseline: float = 0.0

    def to_markdown(self, *, digits: int = 3) -> str:
        """Table: one row per layer, one column per sparsity."""
        head = "| layer | " + " | ".join(f"{s:.0%}" for s in self.sparsities) + " |"
        sep = "|---|" + "---|" * len(self.sparsities)
        rows = [
            f"| {name} | " + " | ".join(f"{a:.{digits}f}" for a in accs) + " |"
            for name, accs in self.accuracy.items()
        ]
        return "\n".join([head, sep, *rows])


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    *,
    granularity: Granularity | None = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    layers: Iterable[str] | None = None,
) -> SensitivityResult:
    """Evaluate ``model`` with each layer alone pruned at each sparsity.

    Args:
        model: trained model (left unchanged; each trial prunes a deep copy).
        evaluate: model -> metric (e.g. test accuracy); called once per (layer, sparsity)
            plus once for the baseline.
        granularity: mask shape (default layer-wise unstructured magnitude).
        sparsities: fractions in [0, 1).
        layers: module names to test (default every Linear/Conv with a >= 2-D weight).
    """
    granularity = granularity or Unstructured()
    base = unwrap_model(model)
    if layers is None:
        layers = [n for n, m in base.named_modules()
                  if isinstance(m, DEFAULT_PRUNABLE) and m.weight.dim() >= 2]
    layers = list(layers)
    modules = dict(base.named_modules())
    for name in layers:
        if name not in modules or not isinstance(getattr(modules[name], "weight", None),
                                                 nn.Parameter):
            raise ValueError(f"layer_sensitivity: {name!r} is not a module with a weight")
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"layer_sensitivity: sparsities must lie in [0, 1), got {s}")
    fixed = granularity.fixed_sparsity
    if fixed is not None and max(sparsities, default=0.0) > fixed + 1e-9:
        raise ValueError(
            f"layer_sensitivity: {type(granularity).__name__} prunes at most {fixed} of a "
            f"layer, but sparsities go up to {max(sparsities)}; pass sparsities <= {fixed}"
        )
    result = SensitivityResult(sparsities=[float(s) for s in sparsities],
                               baseline=float(evaluate(base)))
    for name in layers:
        accs = []
        for s in sparsities:
            trial = copy.deepcopy(base)
            weight = dict(trial.named_modules())[name].weight
            mask = granularity.compute_masks({name: weight}, s)[name]
            weight.masked_fill_(~mask, 0)
            accs.append(float(evaluate(trial)))
        result.accuracy[f"{name}.weight"] = accs
    return result
