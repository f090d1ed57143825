"""N:M fine-grained structured pruning: at most N of every M consecutive weights are kept.

2:4 is the pattern NVIDIA Ampere+ sparse tensor cores run at up to 2x (Mishra et al. 2021,
"Accelerating Sparse Deep Neural Networks"). Groups run along the input dimension: for a
linear weight ``(out, in)`` along ``in``; for a convolution ``(out, in, kh, kw)`` along the
input channels at each kernel position (the ``(out, kh, kw, in)`` order that cuSPARSELt and
NVIDIA's ASP use), so ``in`` must be a multiple of M.

The final sparsity is always ``(M - N) / M``. Under a gradual schedule the intermediate
masks prune ``round(s * M)`` entries of every group, so each group always holds the same
count and the last update lands exactly on N:M. A target above ``(M - N) / M`` is a
``ValueError`` (it is not silently capped).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dgc.pruning.granularity import (
    LayerwiseGranularity,
    count_to_prune,
    element_scores,
    prune_lowest_per_row,
)

__all__ = ["NM"]


def _to_groups_order(t: Tensor) -> Tensor:
    """(out, in, *k) -> (out, *k, in), contiguous: inputs innermost."""
    if t.dim() > 2:
        t = t.movedim(1, -1)
    return t.contiguous()


def _from_groups_order(t: Tensor) -> Tensor:
    if t.dim() > 2:
        t = t.movedim(-1, 1)
    return t


@dataclass(kw_only=True, slots=True)
class NM(LayerwiseGranularity):
    """Keep the N largest ``|w|`` of every M consecutive input weights."""

    n: int = 2
    """Weights kept per group."""
    m: int = 4
    """Group length, along the input dimension."""

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 <= self.n < self.m):
            raise ValueError(
                f"prune.granularity needs ints 0 <= n < m for N:M pruning, got n={self.n!r}, "
                f"m={self.m!r}; e.g. n=2, m=4"
            )

    @property
    def fixed_sparsity(self) -> float:
        return (self.m - self.n) / self.m

    def check(self, name: str, weight: Tensor) -> None:
        if weight.dim() < 2 or weight.shape[1] % self.m != 0:
            raise ValueError(
                f"{self.n}:{self.m} pruning needs the input dimension of {name} "
                f"(shape {tuple(weight.shape)}) to be a multiple of m={self.m}; exclude the "
                "layer with prune.exclude (e.g. the first convolution of an image model)"
            )

    def layer_mask(self, weight: Tensor, sparsity: float, prev_mask: Tensor | None) -> Tensor:
        if sparsity > self.fixed_sparsity + 1e-9:
            raise ValueError(
                f"{self.n}:{self.m} pruning keeps {self.n} of every {self.m} weights, so its "
                f"sparsity is at most {self.fixed_sparsity}; asked for {sparsity}. Use a "
                f"target <= {self.fixed_sparsity} or another granularity (e.g. BankBalanced) "
                "for higher sparsity"
            )
        scores = _to_groups_order(element_scores(weight, prev_mask))
        keep = prune_lowest_per_row(scores.reshape(-1, self.m), count_to_prune(sparsity, self.m))
        return _from_groups_order(keep.view(scores.shape)).contiguous()
