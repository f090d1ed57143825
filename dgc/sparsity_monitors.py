"""Hydra entry point of the ``act`` config group: activation setup plus the monitors the report reads.

Every conf/act/*.yaml has ``_target_: dgc.sparsity_monitors.build_sparsity_monitors`` and
``_partial_: true``; the training loop calls it with the model *before* wrapping it in DDP and
before building the optimizer, and passes what it returns to ``dgc.sparsity_report`` at the
end::

    monitors = hydra.utils.instantiate(cfg.act)(model=model)   # may replace modules in place
    ...
    report = sparsity_report(model, monitors, dgc_state)       # weights, activations, errors, DGC

It does what ``dgc.activation.build_activation`` does (top-k activations, sparse-input linear
layers, an ``ActivationMonitor``) and adds an ``ErrorMonitor`` (``dgc.error_sparsity``) for the
natural sparsity of the backpropagated errors, the seed's third table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from dgc.activation.build import build_activation
from dgc.activation.monitor import ActivationMonitor
from dgc.error_sparsity import ErrorMonitor

__all__ = ["SparsityMonitors", "build_sparsity_monitors"]


@dataclass(kw_only=True, slots=True)
class SparsityMonitors:
    """The forward (activations) and backward (errors) monitors of one model."""

    activations: ActivationMonitor
    """Zero activations per layer (forward hooks)."""
    errors: ErrorMonitor | None
    """Zeros of the backpropagated errors per layer (backward hooks); None: not measured."""

    def reset(self) -> None:
        """Forget the counts of both monitors."""
        self.activations.reset()
        if self.errors is not None:
            self.errors.reset()

    def remove(self) -> None:
        """Remove the hooks of both monitors."""
        self.activations.remove()
        if self.errors is not None:
            self.errors.remove()


def build_sparsity_monitors(model: nn.Module, *, errors: bool = True,
                            **activation: Any) -> SparsityMonitors:
    """Set up activation sparsity on ``model`` (in place) and return both monitors.

    Args:
        errors: also measure the zeros of the backpropagated errors (``ErrorMonitor``), every
            ``activation['every']``-th training pass like the activations.
        activation: the keyword arguments of ``dgc.activation.build_activation`` (``topk``,
            ``sparse_linear``, ``every``, ...).
    """
    if not isinstance(errors, bool):
        raise TypeError(f"act.errors must be true or false (measure the zeros of the "
                        f"backpropagated errors), got {errors!r}")
    monitor = build_activation(model, **activation)
    error_monitor = ErrorMonitor(model, every=activation.get("every", 1)) if errors else None
    return SparsityMonitors(activations=monitor, errors=error_monitor)
