"""Activation sparsity: measure it, control it (k-WTA), and turn it into speed.

- ``ActivationMonitor``: per-layer fraction of zero activations via forward hooks.
- ``TopKActivation``: k-winners-take-all, per sample or per batch.
- ``SparseInputLinear``: ``nn.Linear`` that skips input features zero across the batch.
- ``convert_to_sparse_input`` / ``replace_activations``: module surgery.
- ``build_activation``: the Hydra builder of the ``act`` config group.
"""

from dgc.activation.break_even import BreakEven, measure_break_even
from dgc.activation.build import build_activation
from dgc.activation.convert import convert_to_sparse_input, replace_activations
from dgc.activation.monitor import ActivationMonitor, LayerActivationStats
from dgc.activation.sparse_linear import (
    DEFAULT_MIN_SPARSITY,
    SparseInputLinear,
    sparse_input_linear,
)
from dgc.activation.topk import TopKActivation

__all__ = [
    "DEFAULT_MIN_SPARSITY",
    "ActivationMonitor",
    "BreakEven",
    "LayerActivationStats",
    "SparseInputLinear",
    "TopKActivation",
    "build_activation",
    "convert_to_sparse_input",
    "measure_break_even",
    "replace_activations",
    "sparse_input_linear",
]
