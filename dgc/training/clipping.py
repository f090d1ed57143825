"""Local gradient clipping before communication, the same for every ``compress`` option.

The DGC paper clips each worker's gradient *before* it is accumulated (section 3.3, scaling the
threshold by N^-1/2), because clipping the sparse average afterwards would clip an accumulation of
many steps.  ``train.local_grad_clip`` applies that rule to every run, compressed or not, through
tensor hooks that fire before DDP buckets the gradient, so dense and compressed runs are clipped
identically (``compress.config.clip_norm`` does the same inside DGC; use one, not both).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["LocalGradClip"]


class LocalGradClip:
    """Clip every parameter's local gradient to L2 norm ``max_norm / sqrt(world_size)``."""

    def __init__(self, model: nn.Module, max_norm: float, world_size: int) -> None:
        if not max_norm > 0:
            raise ValueError(f"train.local_grad_clip = {max_norm!r} is invalid: it must be > 0, or "
                             "null for no clipping.")
        self.threshold = max_norm / math.sqrt(world_size)
        self.handles: list[RemovableHandle] = [
            p.register_hook(self._clip) for p in model.parameters() if p.requires_grad
        ]

    def _clip(self, grad: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(grad.float())
        scale = torch.clamp(self.threshold / (norm + 1e-6), max=1.0)
        return grad * scale.to(grad.dtype)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
