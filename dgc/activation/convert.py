"""Module surgery: ``nn.Linear`` -> ``SparseInputLinear``, ReLU -> ``TopKActivation``.

Converted layers reuse the original parameter objects, so an optimizer or DDP wrapper built
before the conversion keeps working (converting before building them is still the clearest
order). Only attribute assignments on the parent module change.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from torch import nn

from dgc.activation.sparse_linear import SparseInputLinear
from dgc.activation.topk import TopKActivation

__all__ = ["ZERO_GRAD_AT_ZERO", "convert_to_sparse_input", "replace_activations"]

#: Activations whose derivative is zero wherever their output is zero: after them, the
#: input gradient of inactive features is never used, so ``input_grad="active"`` is exact.
ZERO_GRAD_AT_ZERO: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, TopKActivation)
#: Modules that keep zeros where they are and pass the gradient through elementwise
#: (dropout zeroes more, with a zero derivative there too).
_PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten, nn.Dropout,
                                              nn.Identity)


def _matches(name: str, include: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    if include is not None and not any(re.fullmatch(p, name) for p in include):
        return False
    return not any(re.fullmatch(p, name) for p in exclude)


def _safe_for_active(parent: nn.Module, child_name: str) -> bool:
    """In a Sequential, is the producer of this child's input zero-derivative at zero?"""
    if not isinstance(parent, nn.Sequential):
        return False
    names = list(parent._modules)
    i = names.index(child_name) - 1
    while i >= 0:
        prev = parent._modules[names[i]]
        if isinstance(prev, ZERO_GRAD_AT_ZERO):
            return True
        if not isinstance(prev, _PASS_THROUGH):
            return False
        i -= 1
    return False


def _feeds_linear(parent: nn.Module, child_name: str) -> bool:
    """In a Sequential, does this child's output reach an ``nn.Linear`` next (through
    Flatten/Dropout/Identity)?"""
    if not isinstance(parent, nn.Sequential):
        return False
    names = list(parent._modules)
    for name in names[names.index(child_name) + 1:]:
        nxt = parent._modules[name]
        if isinstance(nxt, nn.Linear):
            return True
        if not isinstance(nxt, _PASS_THROUGH):
            return False
    return False


def _named_children_recursive(model: nn.Module) -> Iterable[tuple[str, nn.Module, str,
                                                                  nn.Module]]:
    """(full name, parent, attribute name, child) for every submodule, parents first."""
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            full = f"{parent_name}.{attr}" if parent_name else attr
            yield full, parent, attr, child


def convert_to_sparse_input(
    model: nn.Module,
    *,
    input_grad: Literal["auto", "full", "active"] = "auto",
    min_sparsity: float | Literal["auto"] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> list[str]:
    """Replace ``nn.Linear`` submodules by ``SparseInputLinear``, in place.

    Args:
        model: the model (not a DDP wrapper: convert before wrapping).
        input_grad: ``"auto"`` = ``"active"`` where the layer sits in an ``nn.Sequential``
            right after a ReLU/ReLU6/TopK (through Flatten/Dropout/Identity), ``"full"``
            elsewhere; or force one mode for all.
        min_sparsity: see ``SparseInputLinear``.
        include / exclude: regexes (``re.fullmatch``) on module names.

    Returns the names of the converted modules.
    """
    if input_grad not in ("auto", "full", "active"):
        raise ValueError(f"act.input_grad must be 'auto', 'full' or 'active', got "
                         f"{input_grad!r}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("convert_to_sparse_input: convert the model before wrapping it in DDP")
    converted = []
    for full, parent, attr, child in _named_children_recursive(model):
        if type(child) is not nn.Linear or not _matches(full, include, list(exclude)):
            continue
        mode = input_grad
        if mode == "auto":
            mode = "active" if _safe_for_active(parent, attr) else "full"
        setattr(parent, attr, SparseInputLinear.from_linear(
            child, min_sparsity=min_sparsity, input_grad=mode))
        converted.append(full)
    return converted


def replace_activations(
    model: nn.Module,
    factory: Callable[[nn.Module], nn.Module],
    *,
    types: tuple[type[nn.Module], ...] = (nn.ReLU,),
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    before_linear_only: bool = False,
) -> list[str]:
    """Replace every submodule of ``types`` by ``factory(old_module)``, in place.

    Only module activations are found; ``F.relu`` calls inside ``forward`` are not.
    ``before_linear_only`` restricts the replacement to activations that feed an
    ``nn.Linear`` in an ``nn.Sequential`` (where batch-wide zeros become speed).
    Returns the names of the replaced modules.
    """
    replaced = []
    for full, parent, attr, child in _named_children_recursive(model):
        if before_linear_only and not _feeds_linear(parent, attr):
            continue
        if isinstance(child, types) and _matches(full, include, list(exclude)):
            setattr(parent, attr, factory(child))
            replaced.append(full)
    return replaced


def topk_factory(k: int | float, per: str = "sample", relu: bool = False) -> Callable[
        [nn.Module], nn.Module]:
    """Factory for ``replace_activations`` that builds ``TopKActivation``s."""
    def make(old: Any) -> nn.Module:
        return TopKActivation(k, per=per, relu=relu)  # type: ignore[arg-type]
    return make
