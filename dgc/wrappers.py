"""Find the user's model inside the wrappers training adds around it (DDP, ``torch.compile``).

Pruning, activation monitoring and the sparsity report all name layers as the user's model
does (``features.0.weight``, not ``module.features.0.weight``), whatever wraps it.
"""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / ``torch.compile`` wrappers (``.module``, ``._orig_mod``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
