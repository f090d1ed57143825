"""End-of-training sparsity report: the seed's three tables (weights, activations, backpropagated
errors) and the gradient sparsity DGC induces.

It reads all of them, so it sits above ``dgc.pruning`` (mask buffers), ``dgc.activation`` (an
``ActivationMonitor``), ``dgc.error_sparsity`` (an ``ErrorMonitor``) and DGC (a ``DGCState``)
and none of them imports it.

1. **Weights**: fraction of exactly-zero entries of every >= 2-D parameter (pruned or not),
   and whether a pruning mask is attached.
2. **Activations**: fraction of zero activations per layer from an ``ActivationMonitor``
   (plus, for linear-layer inputs, the fraction of features zero across a batch).
3. **Backpropagated errors** (the seed's gradient table, natural sparsity): per layer with a
   weight, the fraction of zeros in the error reaching its output (``dL/dy``, zero where the
   ReLU / max-pooling above did not pass it) and in the error at its input, from an
   ``ErrorMonitor`` (backward hooks).
4. **Gradients sent by DGC** (induced sparsity): per parameter, the fraction of the gradient DGC
   sends at its current step (``k / numel``; 1.0 for tensors on the dense path), the live
   (unmasked) fraction, and the last step's achieved density over all tensors
   (``DGCState.stats``).

``to_markdown()`` renders the four tables; ``to_json()`` the same figures as JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from dgc.pruning.pruner import MASK_SUFFIX
from dgc.sparsity_monitors import SparsityMonitors
from dgc.wrappers import unwrap_model

__all__ = ["ActivationRow", "ErrorRow", "GradientRow", "SparsityReport", "WeightRow",
           "sparsity_report"]


@dataclass(kw_only=True, slots=True)
class WeightRow:
    numel: int
    zeros: int
    sparsity: float
    """Fraction of entries exactly zero."""
    masked: bool
    """A pruning mask buffer is attached to this parameter."""


@dataclass(kw_only=True, slots=True)
class ActivationRow:
    sparsity: float
    """Fraction of zero activations."""
    feature_sparsity: float | None
    """Fraction of input features zero across a batch (linear-layer inputs only)."""
    batches: int


@dataclass(kw_only=True, slots=True)
class ErrorRow:
    output_sparsity: float
    """Fraction of zeros in the error reaching the layer's output, ``dL/d(output)``."""
    input_sparsity: float | None
    """Fraction of zeros in ``dL/d(input)``; None where the input needs no gradient."""
    batches: int


@dataclass(kw_only=True, slots=True)
class GradientRow:
    numel: int
    live: int
    """Entries not masked by pruning (DGC selects among these only)."""
    sent: int
    """Entries DGC sends per step for this tensor at its current density (numel if dense)."""
    density: float
    """``sent / numel``: gradient density per layer."""
    compressed: bool
    """Whether the tensor currently goes through top-k (False: dense allreduce)."""


@dataclass(kw_only=True, slots=True)
class SparsityReport:
    """Weight, activation and gradient sparsity per layer."""

    weights: dict[str, WeightRow] = field(default_factory=dict)
    activations: dict[str, ActivationRow] = field(default_factory=dict)
    errors: dict[str, ErrorRow] = field(default_factory=dict)
    """Natural zeros of the backpropagated errors, by layer (module) name."""
    gradients: dict[str, GradientRow] = field(default_factory=dict)
    dgc_step: int | None = None
    """DGC communication step the gradient figures refer to (None: no DGC)."""
    achieved_density: float | None = None
    """Elements sent over elements in DGC's last completed step (all tensors)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": {k: asdict(v) for k, v in self.weights.items()},
            "activations": {k: asdict(v) for k, v in self.activations.items()},
            "errors": {k: asdict(v) for k, v in self.errors.items()},
            "gradients": {k: asdict(v) for k, v in self.gradients.items()},
            "dgc_step": self.dgc_step,
            "achieved_density": self.achieved_density,
        }

    def to_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    def to_markdown(self) -> str:
        parts = [self._weights_md(), self._activations_md(), self._errors_md(), self._gradients_md()]
        return "\n\n".join(parts) + "\n"

    def _weights_md(self) -> str:
        out = ["### Weight sparsity", "", "| layer | entries | zeros | sparsity | masked |",
               "|---|---:|---:|---:|:---:|"]
        for name, w in self.weights.items():
            out.append(f"| {name} | {w.numel} | {w.zeros} | {w.sparsity:.2%} | "
                       f"{'yes' if w.masked else ''} |")
        total = sum(w.numel for w in self.weights.values())
        zeros = sum(w.zeros for w in self.weights.values())
        if total:
            out.append(f"| **total** | {total} | {zeros} | {zeros / total:.2%} | |")
        return "\n".join(out)

    def _activations_md(self) -> str:
        out = ["### Activation sparsity", ""]
        if not self.activations:
            return "\n".join([*out, "(no activation monitor)"])
        out += ["| layer | zero activations | features zero batch-wide | batches |",
                "|---|---:|---:|---:|"]
        for name, a in self.activations.items():
            feat = "" if a.feature_sparsity is None else f"{a.feature_sparsity:.2%}"
            out.append(f"| {name} | {a.sparsity:.2%} | {feat} | {a.batches} |")
        return "\n".join(out)

    def _errors_md(self) -> str:
        out = ["### Backpropagated error sparsity (natural)", ""]
        if not self.errors:
            return "\n".join([*out, "(no error monitor)"])
        out += ["Zeros of the error backpropagation hands each layer, before any compression: "
                "at its output (dL/dy, gated by the ReLU / max-pooling above; times the layer's "
                "input it is the weight gradient) and at its input (what it passes down).",
                "", "| layer | zero error at output | zero error at input | backward passes |",
                "|---|---:|---:|---:|"]
        for name, e in self.errors.items():
            below = "" if e.input_sparsity is None else f"{e.input_sparsity:.2%}"
            out.append(f"| {name} | {e.output_sparsity:.2%} | {below} | {e.batches} |")
        return "\n".join(out)

    def _gradients_md(self) -> str:
        out = ["### Gradient density (DGC, induced)", ""]
        if not self.gradients:
            return "\n".join([*out, "(no DGC state)"])
        if self.achieved_density is not None:
            out += [f"Step {self.dgc_step}; achieved density of the last step over all tensors: "
                    f"{self.achieved_density:.4%}.", ""]
        out += ["| parameter | entries | live | sent / step | density | path |",
                "|---|---:|---:|---:|---:|:---:|"]
        for name, g in self.gradients.items():
            out.append(f"| {name} | {g.numel} | {g.live} | {g.sent} | {g.density:.4%} | "
                       f"{'top-k' if g.compressed else 'dense'} |")
        return "\n".join(out)


def _weights(base: nn.Module) -> dict[str, WeightRow]:
    rows = {}
    for mod_name, module in base.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if p.dim() < 2:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            zeros = int((p.detach() == 0).sum())
            rows[full] = WeightRow(
                numel=p.numel(), zeros=zeros, sparsity=zeros / p.numel(),
                masked=getattr(module, p_name + MASK_SUFFIX, None) is not None,
            )
    return rows


def _gradients(report: SparsityReport, dgc_state: Any) -> None:
    report.dgc_step = int(dgc_state.step)
    stats = getattr(dgc_state, "stats", None)
    if stats is not None and getattr(stats, "elements", 0):
        report.achieved_density = float(stats.achieved_density)
    for name, mem in dgc_state.memory.items():
        compressed = bool(dgc_state.is_compressed(name))
        sent = dgc_state.k_for(name) if compressed else mem.numel
        report.gradients[name] = GradientRow(
            numel=mem.numel, live=int(mem.live), sent=int(sent),
            density=sent / mem.numel if mem.numel else 0.0, compressed=compressed,
        )


def sparsity_report(model: nn.Module, activation_monitor: Any = None,
                    dgc_state: Any = None, error_monitor: Any = None) -> SparsityReport:
    """Collect the tables from the model and the monitors and DGC state given.

    ``model`` may be a DDP wrapper. Weight rows cover every parameter with >= 2 dimensions.
    ``activation_monitor`` is an ``ActivationMonitor`` or the ``SparsityMonitors`` the ``act``
    config group builds (whose ``ErrorMonitor`` fills the error table unless ``error_monitor``,
    a ``dgc.error_sparsity.ErrorMonitor``, is given). ``dgc_state`` is a ``DGCState``.
    """
    if isinstance(activation_monitor, SparsityMonitors):
        error_monitor = error_monitor if error_monitor is not None else activation_monitor.errors
        activation_monitor = activation_monitor.activations
    report = SparsityReport(weights=_weights(unwrap_model(model)))
    if activation_monitor is not None:
        for name, st in activation_monitor.summary().items():
            report.activations[name] = ActivationRow(
                sparsity=st.sparsity, feature_sparsity=st.feature_sparsity, batches=st.batches)
    if error_monitor is not None:
        for name, st in error_monitor.summary().items():
            report.errors[name] = ErrorRow(output_sparsity=st.output_sparsity,
                                           input_sparsity=st.input_sparsity, batches=st.batches)
    if dgc_state is not None:
        _gradients(report, dgc_state)
    return report
