"""Activation sparsity measurement: forward hooks count exact zeros per layer.

The monitor hooks the outputs of activation modules (ReLU family, ``TopKActivation``) and the
inputs of ``SparseInputLinear`` layers, and accumulates two figures per layer:

- ``sparsity``: fraction of zero entries (the seed's per-layer activation tables);
- ``feature_sparsity`` (inputs of linear layers only): fraction of input features that are
  zero across the whole batch, the figure ``SparseInputLinear`` turns into speed.

Counts stay on the device as tensors and are only read by ``summary()``, so measuring adds
no host synchronization to the step. ``every`` measures one forward pass in N to make the
cost negligible; only passes in training mode are counted unless ``training_only=False``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dgc.activation.topk import TopKActivation
from dgc.wrappers import unwrap_model

__all__ = ["DEFAULT_ACTIVATIONS", "ActivationMonitor", "LayerActivationStats"]

#: Module types whose *output* is measured by default.
DEFAULT_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Threshold, TopKActivation,
)


@dataclass(kw_only=True, slots=True)
class LayerActivationStats:
    """Measured zeros of one layer since the last ``reset()``."""

    sparsity: float
    """Fraction of zero entries."""
    feature_sparsity: float | None
    """Fraction of features zero across a whole batch (linear-layer inputs), else None."""
    batches: int
    """Forward passes measured."""


class _Counter:
    __slots__ = ("zeros", "numel", "dead_features", "features", "batches")

    def __init__(self) -> None:
        self.zeros: Tensor | int = 0
        self.numel = 0
        self.dead_features: Tensor | int = 0
        self.features = 0
        self.batches = 0


class ActivationMonitor:
    """Per-layer activation sparsity via forward hooks.

    Args:
        model: the model (or its DDP wrapper; names come from the unwrapped model).
        activation_types: modules whose output is measured.
        measure_linear_inputs: also measure the inputs of ``nn.Linear`` layers (including
            ``SparseInputLinear``, a subclass), with their batch-wide feature sparsity.
        every: measure one forward pass in ``every`` (1 = all).
        training_only: ignore passes with the module in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        activation_types: Iterable[type[nn.Module]] = DEFAULT_ACTIVATIONS,
        measure_linear_inputs: bool = True,
        every: int = 1,
        training_only: bool = True,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"act.every must be an int >= 1 (1 = every pass), got {every!r}")
        self.every = every
        self.training_only = training_only
        self._counters: dict[str, _Counter] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []
        act_types = tuple(activation_types)
        for name, module in unwrap_model(model).named_modules():
            if isinstance(module, act_types):
                self._add(name, module, output=True)
            elif measure_linear_inputs and isinstance(module, nn.Linear):
                self._add(f"{name} (input)", module, output=False)

    def _add(self, key: str, module: nn.Module, *, output: bool) -> None:
        self._counters[key] = _Counter()
        self._calls[key] = 0
        if output:
            def hook(mod: nn.Module, args: Any, out: Any) -> None:
                self._record(key, mod, out, features=False)
            self._handles.append(module.register_forward_hook(hook))
        else:
            def pre_hook(mod: nn.Module, args: Any) -> None:
                self._record(key, mod, args[0], features=True)
            self._handles.append(module.register_forward_pre_hook(pre_hook))

    @torch.no_grad()
    def _record(self, key: str, module: nn.Module, x: Any, *, features: bool) -> None:
        if not isinstance(x, Tensor) or (self.training_only and not module.training):
            return
        self._calls[key] += 1
        if (self._calls[key] - 1) % self.every:
            return
        c = self._counters[key]
        zero = x.detach() == 0
        c.zeros = c.zeros + zero.sum()
        c.numel += zero.numel()
        c.batches += 1
        if features and x.dim() >= 1:
            dead = zero.reshape(-1, x.shape[-1]).all(dim=0)
            c.dead_features = c.dead_features + dead.sum()
            c.features += dead.numel()

    def summary(self) -> dict[str, LayerActivationStats]:
        """Stats per layer since the last ``reset()`` (layers never measured are left out)."""
        out = {}
        for key, c in self._counters.items():
            if c.numel == 0:
                continue
            feat = float(c.dead_features) / c.features if c.features else None
            out[key] = LayerActivationStats(sparsity=float(c.zeros) / c.numel,
                                            feature_sparsity=feat, batches=c.batches)
        return out

    def sparsity(self) -> dict[str, float]:
        """Layer -> fraction of zero entries since the last ``reset()``."""
        return {k: v.sparsity for k, v in self.summary().items()}

    def reset(self) -> None:
        """Forget the counts (e.g. at the start of each epoch)."""
        for key in self._counters:
            self._counters[key] = _Counter()

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
