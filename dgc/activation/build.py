"""Hydra entry point of the ``act`` config group (conf/act/*.yaml).

Every YAML file has ``_target_: dgc.activation.build_activation`` and ``_partial_: true``;
the training loop calls it with the model *before* wrapping it in DDP and before building
the optimizer, and keeps the returned monitor for the sparsity report::

    monitor = hydra.utils.instantiate(cfg.act)(model=model)   # may replace modules in place
    ...
    monitor.reset()                     # optional, e.g. each epoch
    report = sparsity_report(model, monitor, dgc_state)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from dgc.activation.convert import convert_to_sparse_input, replace_activations, topk_factory
from dgc.activation.monitor import ActivationMonitor

__all__ = ["build_activation"]


def build_activation(
    model: nn.Module,
    *,
    topk: int | float | None = None,
    topk_per: Literal["sample", "batch"] = "sample",
    topk_relu: bool = True,
    topk_include: Sequence[str] | None = None,
    topk_exclude: Sequence[str] = (),
    topk_before_linear_only: bool = False,
    sparse_linear: bool = False,
    input_grad: Literal["auto", "full", "active"] = "auto",
    min_sparsity: float | Literal["auto"] | None = None,
    linear_include: Sequence[str] | None = None,
    linear_exclude: Sequence[str] = (),
    every: int = 1,
) -> ActivationMonitor:
    """Set up activation sparsity on ``model`` (in place) and return its monitor.

    Args:
        topk: None = keep the activations; else replace every ``nn.ReLU`` by
            ``TopKActivation(topk)`` (int count or float fraction of features).
        topk_per / topk_relu: ``TopKActivation``'s ``per`` and ``relu``.
        topk_include / topk_exclude: regexes on the names of the ReLU modules to replace.
        topk_before_linear_only: replace only the ReLUs that feed an ``nn.Linear`` (in an
            ``nn.Sequential``), e.g. to leave convolutional feature maps alone.
        sparse_linear: replace ``nn.Linear`` layers by ``SparseInputLinear``.
        input_grad / min_sparsity: passed to ``convert_to_sparse_input``.
        linear_include / linear_exclude: regexes on the names of the linear layers.
        every: the monitor measures one forward pass in ``every``.
    """
    if topk is not None:
        replace_activations(model, topk_factory(topk, topk_per, topk_relu),
                            include=topk_include, exclude=tuple(topk_exclude),
                            before_linear_only=topk_before_linear_only)
    if sparse_linear:
        convert_to_sparse_input(
            model, input_grad=input_grad, min_sparsity=min_sparsity,
            include=None if linear_include is None else list(linear_include),
            exclude=tuple(linear_exclude),
        )
    return ActivationMonitor(model, every=every)
