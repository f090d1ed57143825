"""k-winners-take-all: keep the k largest activations, zero the rest.

Makes activation sparsity a setting instead of a by-product of ReLU (Makhzani & Frey 2014,
"k-Sparse Autoencoders"; Ahmad & Scheinkman 2019, "How Can We Be So Dense?").

- ``per="sample"`` (k-WTA): each sample keeps its own k largest features, exactly k per
  sample (ties broken by ``torch.topk``). Sparsity is exact, but different samples keep
  different features, so a whole batch rarely shares a zero feature.
- ``per="batch"``: the k features with the largest mean activation over the batch are kept
  for every sample; the other features are zero across the batch, which is what
  ``SparseInputLinear`` turns into speed. The output of one sample then depends on the rest
  of its batch, like batch norm in training mode.

The gradient flows through the kept entries only (the mask is a constant).
``relu=True`` also zeroes kept entries that are negative (k-WTA after a ReLU).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["TopKActivation"]


class TopKActivation(nn.Module):
    """Keep the top ``k`` of the features of each sample (or of the batch), zero the rest.

    Args:
        k: features kept: an int >= 1, or a float in (0, 1] = fraction of the features
            (rounded, at least 1).
        per: ``"sample"`` or ``"batch"`` (see the module docstring).
        relu: also zero negative kept values.

    Features are all dimensions but the first (batch) one, flattened: for ``(B, C, H, W)``
    the top k of the C*H*W entries per sample.
    """

    def __init__(self, k: int | float, *, per: Literal["sample", "batch"] = "sample",
                 relu: bool = False) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int | float):
            raise TypeError(f"act.k must be an int count or a float fraction, got {k!r}")
        if isinstance(k, int) and k < 1:
            raise ValueError(f"act.k as an int is a count and must be >= 1, got {k}")
        if isinstance(k, float) and not 0.0 < k <= 1.0:
            raise ValueError(f"act.k as a float is a fraction and must lie in (0, 1], got {k}")
        if per not in ("sample", "batch"):
            raise ValueError(f"act.per must be 'sample' or 'batch', got {per!r}")
        self.k = k
        self.per = per
        self.relu = relu

    def k_for(self, features: int) -> int:
        """Number of features kept out of ``features``."""
        k = self.k if isinstance(self.k, int) else max(1, round(self.k * features))
        return min(k, features)

    def extra_repr(self) -> str:
        return f"k={self.k}, per={self.per!r}, relu={self.relu}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"TopKActivation needs (batch, features...), got shape "
                             f"{tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1)
        k = self.k_for(flat.shape[1])
        with torch.no_grad():
            if self.per == "sample":
                idx = flat.topk(k, dim=1, sorted=False).indices
                keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
            else:
                idx = flat.mean(dim=0).topk(k, sorted=False).indices
                keep_f = torch.zeros(flat.shape[1], dtype=torch.bool, device=x.device)
                keep = keep_f.index_fill_(0, idx, True).expand_as(flat)
            if self.relu:
                keep = keep & (flat > 0)
        return flat.masked_fill(~keep, 0).view_as(x)
