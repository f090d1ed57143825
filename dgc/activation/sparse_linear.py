"""A linear layer that turns input features zero across the whole batch into speed.

The computation itself (gather the active features, small products, gradients scattered back,
and the two input-gradient modes) is ``dgc.activation.sparse_product``; this module decides per
forward whether it runs.

When the sparse path runs (cheapest test first, see ``SparseInputLinear.forward``):

1. ``min_sparsity=1.0``: never; the input is not looked at.
2. The previous forward ran dense and fewer than ``check_every`` forwards of this input
   size have passed since the input was last looked at: dense, without looking.
3. Default ``min_sparsity=None``: a cost model of this layer's shape, thread count and
   which gradients are needed (``dgc.activation.break_even.predicted_break_even``) gives the
   break-even sparsity; where the model says the sparse path can never pay (small layers, few
   output features, small batches), or on a non-CPU device (finding the active features
   needs a host sync there), dense without looking. An explicit float skips the model.
4. Otherwise the active features are found (two column reductions) and the sparse path runs
   if the fraction of batch-wide zero features reaches the threshold.

So below the break-even the extra cost over ``nn.Linear`` is the zero check on one forward
in ``check_every`` plus a few hundred nanoseconds of Python per forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgc.activation.break_even import (
    DEFAULT_MIN_SPARSITY,
    measure_break_even,
    predicted_break_even,
)
from dgc.activation.sparse_product import InputGrad, active_features, sparse_input_linear

__all__ = [
    "DEFAULT_CHECK_EVERY",
    "DEFAULT_MIN_SPARSITY",
    "SparseInputLinear",
    "active_features",
    "sparse_input_linear",
]

log = logging.getLogger(__name__)

#: After a forward that ran dense, this many forwards (of the same input size) run dense
#: without looking at the input, counting that one: the zero check then costs 1/16 of its
#: time below the break-even. Batch-wide sparsity drifts over many steps, not from one to the
#: next, so little speed is lost where it crosses the threshold.
DEFAULT_CHECK_EVERY = 16

_NEVER = 1 << 62  # "skip forever" for min_sparsity=1.0

# (device type, dtype, batch, in, out, input_grad) -> measured break-even, for "auto".
_BREAK_EVEN_CACHE: dict[tuple[Any, ...], float] = {}


@dataclass(slots=True)
class _PathState:
    """Per-layer routing state (a slotted object: setting a plain ``nn.Module`` attribute
    costs ~1-3 us, a few percent of a small layer's forward+backward)."""

    skip: int = 0
    """Forwards left that run dense without looking at the input."""
    skip_numel: int = -1
    """The input size ``skip`` applies to; another size is routed afresh."""
    sparse: bool = False
    """Whether the last forward ran the sparse path."""
    feature_sparsity: float | None = None
    """Fraction of batch-wide zero input features at the last check (None: never checked)."""


def _check_min_sparsity(value: Any) -> None:
    if value is not None and value != "auto" and (
            isinstance(value, bool) or not isinstance(value, int | float)
            or not 0.0 <= value <= 1.0):
        raise ValueError(
            f"act.min_sparsity must be a fraction in [0, 1], 'auto' or null (the cost model "
            f"per shape), got {value!r}"
        )


class SparseInputLinear(nn.Linear):
    """Drop-in ``nn.Linear`` that skips input features zero across the whole batch.

    Same parameters and ``state_dict`` as ``nn.Linear``. Extra args:
        min_sparsity: fraction of batch-wide zero input features from which the sparse path
            runs (below it: dense ``F.linear``). ``None`` (default) = the cost model's
            break-even for this shape, thread count and device (dense outright where the
            sparse path cannot pay, and on non-CPU devices); a float in [0, 1] = that
            threshold at every shape and device (1.0 = always dense, the input is never
            looked at); ``"auto"`` = measure the break-even for this shape and batch on
            first use (``measure_break_even``; slow, and noisy on a loaded machine).
        input_grad: ``"full"`` (input gradient equal to ``nn.Linear``'s) or ``"active"``
            (zero for inactive features; exact upstream after ReLU/TopK, see the module
            docstring).
        check_every: after a forward that ran dense, the next ``check_every - 1`` forwards
            with an input of the same size run dense without looking at it (1 = look at
            every forward). Speed only: both paths give the same results.

    ``last_sparse`` says whether the last forward ran the sparse path, and
    ``last_feature_sparsity`` the fraction of batch-wide zero input features found by the
    last check (None before the first one).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = None, *,
                 min_sparsity: float | Literal["auto"] | None = None,
                 input_grad: InputGrad = "full",
                 check_every: int = DEFAULT_CHECK_EVERY) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        if input_grad not in ("full", "active"):
            raise ValueError(f"act.input_grad must be 'full' or 'active', got {input_grad!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"act.check_every must be an int >= 1 (1 = check every forward), "
                             f"got {check_every!r}")
        self._state = _PathState()
        self.input_grad: InputGrad = input_grad
        self.min_sparsity = min_sparsity
        self.check_every = check_every

    @property
    def min_sparsity(self) -> float | Literal["auto"] | None:
        return self._min_sparsity

    @min_sparsity.setter
    def min_sparsity(self, value: float | Literal["auto"] | None) -> None:
        _check_min_sparsity(value)
        self._min_sparsity = value
        self._state.skip = 0  # route the next forward afresh

    @property
    def last_sparse(self) -> bool:
        return self._state.sparse

    @property
    def last_feature_sparsity(self) -> float | None:
        return self._state.feature_sparsity

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> SparseInputLinear:
        """A ``SparseInputLinear`` sharing ``linear``'s parameter objects (optimizers and DDP
        that already hold them keep working)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device="meta", **kwargs)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, min_sparsity={self.min_sparsity}, "
                f"input_grad={self.input_grad!r}, check_every={self.check_every}")

    def threshold(self, batch: int, x: Tensor) -> float:
        """Feature sparsity from which the sparse path runs, for this input (1.0: never)."""
        ms = self._min_sparsity
        if ms is None:
            grad = torch.is_grad_enabled()
            return predicted_break_even(
                batch=batch, in_features=self.in_features, out_features=self.out_features,
                input_grad=self.input_grad, device_type=x.device.type, dtype=x.dtype,
                threads=torch.get_num_threads(),
                input_requires_grad=grad and x.requires_grad,
                weight_requires_grad=grad and self.weight.requires_grad,
            )
        if ms != "auto":
            return float(ms)
        key = (x.device.type, x.dtype, batch, self.in_features, self.out_features,
               self.input_grad)
        if key not in _BREAK_EVEN_CACHE:
            _BREAK_EVEN_CACHE[key] = measure_break_even(
                batch=batch, in_features=self.in_features, out_features=self.out_features,
                input_grad=self.input_grad, device=x.device, dtype=x.dtype,
            ).break_even
            log.info("SparseInputLinear break-even for %s: %.2f", key, _BREAK_EVEN_CACHE[key])
        return _BREAK_EVEN_CACHE[key]

    def forward(self, x: Tensor) -> Tensor:
        # Step 2 of the module docstring first: the common case below the break-even costs
        # one attribute test and a size comparison, no tensor op.
        state = self._state
        if state.skip and x.numel() == state.skip_numel:
            state.skip -= 1
            state.sparse = False
            return F.linear(x, self.weight, self.bias)
        return self._route(x)

    def _dense(self, x: Tensor, skip: int) -> Tensor:
        state = self._state
        state.skip, state.skip_numel, state.sparse = skip, x.numel(), False
        return F.linear(x, self.weight, self.bias)

    def _route(self, x: Tensor) -> Tensor:
        # Step 1: always dense, never look.
        if self._min_sparsity == 1.0:
            return self._dense(x, _NEVER)
        n = x.numel() // self.in_features if self.in_features else 0
        # Step 3: the threshold (cost model, explicit or measured), before any tensor op.
        threshold = self.threshold(n, x) if n else 1.0
        if threshold >= 1.0:
            return self._dense(x, self.check_every - 1)
        # Step 4: look at the input.
        x2 = x.reshape(n, self.in_features)
        idx = active_features(x2)
        sparsity = 1.0 - idx.numel() / self.in_features
        self._state.feature_sparsity = sparsity
        if sparsity <= 0.0 or sparsity < threshold:
            return self._dense(x, self.check_every - 1)
        self._state.sparse, self._state.skip = True, 0
        weight, bias = self.weight, self.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast like autocast would for F.linear, then run the Function without autocast
            # so forward and backward see one dtype.
            dtype = torch.get_autocast_dtype(device_type)
            x2, weight = x2.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            with torch.autocast(device_type, enabled=False):
                y = sparse_input_linear(x2, weight, bias, idx, input_grad=self.input_grad)
        else:
            y = sparse_input_linear(x2, weight, bias, idx, input_grad=self.input_grad)
        return y.view(*x.shape[:-1], self.out_features)
