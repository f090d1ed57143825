"""Natural sparsity of backpropagated errors: backward hooks count exact zeros per layer.

The seed's third table is not the sparsity DGC induces in the gradients it sends but the zeros
that backpropagation produces on its own: the error ``dL/dy`` reaching a layer's output ``y``
is zero wherever the ReLU above it was inactive and wherever a max-pooling window did not pick
that position (a 2x2 max-pool alone zeroes 3 of 4 positions), ~75-85% on a CIFAR-10 CNN. That
error times the layer's input is the weight gradient, so its zeros are the ones a backward
pass could skip.

``ErrorMonitor`` hooks every layer that owns a >= 2-D parameter (the rows of the weight table:
``nn.Conv*``, ``nn.Linear`` and its subclasses, ``nn.LSTM``, ``nn.Embedding``, ...). A forward
hook registers a gradient hook on the layer's output tensor (and a forward pre-hook one on its
input when that requires a gradient), so the figures are the gradients autograd computes, also
when the next module works in place (``nn.ReLU(inplace=True)``). Per layer:

- ``output_sparsity``: fraction of zeros in ``dL/d(output)``, the error reaching the layer;
- ``input_sparsity``: fraction of zeros in ``dL/d(input)``, the error at the layer's input
  (summed over all its consumers; None where the input needs no gradient, e.g. the images).

Counts stay on the device and are read by ``summary()`` only; ``every`` measures one training
forward pass in N. Under DDP the figures are the local errors of this rank (before any
communication).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dgc.wrappers import unwrap_model

__all__ = ["ErrorMonitor", "LayerErrorStats", "weight_layers"]


@dataclass(kw_only=True, slots=True)
class LayerErrorStats:
    """Measured zeros of one layer's backpropagated errors since the last ``reset()``."""

    output_sparsity: float
    """Fraction of zero entries of the error reaching the layer's output, ``dL/d(output)``."""
    input_sparsity: float | None
    """Fraction of zero entries of ``dL/d(input)``; None: the input needs no gradient."""
    batches: int
    """Backward passes measured (at the output)."""


class _Count:
    __slots__ = ("zeros", "numel", "batches")

    def __init__(self) -> None:
        self.zeros: Tensor | int = 0
        self.numel = 0
        self.batches = 0

    def add(self, grad: Tensor) -> None:
        self.zeros = self.zeros + (grad.detach() == 0).sum()
        self.numel += grad.numel()
        self.batches += 1

    def fraction(self) -> float | None:
        return float(self.zeros) / self.numel if self.numel else None


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own a >= 2-D parameter directly, by name (the weight table's layers)."""
    return {
        name: module for name, module in unwrap_model(model).named_modules()
        if any(p.dim() >= 2 for p in module.parameters(recurse=False))
    }


def _first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    return None


class ErrorMonitor:
    """Per-layer zeros of the backpropagated errors, via gradient hooks set in forward hooks.

    Args:
        model: the model (or its DDP wrapper; names come from the unwrapped model).
        every: measure the backward of one training forward pass in ``every`` (1 = all).
    """

    def __init__(self, model: nn.Module, *, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"act.every (ErrorMonitor every) must be an int >= 1 (1 = every "
                             f"pass), got {every!r}")
        self.every = every
        self._out: dict[str, _Count] = {}
        self._in: dict[str, _Count] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []
        for name, module in weight_layers(model).items():
            self._add(name, module)

    def _add(self, name: str, module: nn.Module) -> None:
        self._out[name], self._in[name], self._calls[name] = _Count(), _Count(), 0
        measuring = [False]  # decided per forward pass by the pre-hook, read by the hook

        def pre_hook(mod: nn.Module, args: Any) -> None:
            measuring[0] = self._measures(name, mod)
            x = _first_tensor(args)
            if measuring[0] and x is not None and x.requires_grad:
                x.register_hook(self._in[name].add)

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            y = _first_tensor(out)
            if measuring[0] and y is not None and y.requires_grad:
                y.register_hook(self._out[name].add)

        self._handles.append(module.register_forward_pre_hook(pre_hook))
        self._handles.append(module.register_forward_hook(hook))

    def _measures(self, name: str, module: nn.Module) -> bool:
        """Counts a training forward pass with autograd on; True when its backward is measured."""
        if not (module.training and torch.is_grad_enabled()):
            return False
        self._calls[name] += 1
        return (self._calls[name] - 1) % self.every == 0

    def summary(self) -> dict[str, LayerErrorStats]:
        """Stats per layer since the last ``reset()`` (layers never measured are left out)."""
        out = {}
        for name, c in self._out.items():
            frac = c.fraction()
            if frac is None:
                continue
            out[name] = LayerErrorStats(output_sparsity=frac, input_sparsity=self._in[name].fraction(),
                                        batches=c.batches)
        return out

    def reset(self) -> None:
        """Forget the counts (e.g. at the start of each epoch)."""
        for name in self._out:
            self._out[name], self._in[name] = _Count(), _Count()

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
