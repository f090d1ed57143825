"""A linear layer that turns input features zero across the whole batch into speed.

When a feature j of the input is zero for every sample of the batch, column j of the weight
contributes nothing to the output and its weight gradient is exactly zero. The layer gathers
the k active features (``index_select`` on x and on the columns of W), multiplies the small
matrices, and scatters the weight gradient back into a zero gradient of the full shape:

    forward   y   = x[:, A] @ W[:, A].T + b                  (N x k) @ (k x out)
    backward  dW  = scatter_A( gy.T @ x[:, A] )              zero outside A, exactly
              db  = gy.sum(0)
              dx  = gy @ W                 input_grad="full"   (dense, exact)
              dx  = scatter_A( gy @ W[:, A] )  input_grad="active" (zero outside A)

Forward output and the W and b gradients equal ``nn.Linear``'s to float tolerance (only the
summation order differs). The input gradient:

- ``input_grad="full"`` (default): exact, but one of the three products stays dense, so the
  speed-up is bounded by about 3x.
- ``input_grad="active"``: the gradient of the inactive features is set to zero. That is
  exact for the *network* whenever the producer of x has zero derivative where its output is
  zero (ReLU, ReLU6, ``TopKActivation``, k-WTA): the zeroed entries are multiplied by that
  zero derivative anyway. Then all three products shrink and the layer runs up to ~1/(1-s)
  faster. ``convert_to_sparse_input(input_grad="auto")`` picks it where it is safe.

Below ``min_sparsity`` (fraction of batch-wide zero features) the layer runs the dense
``F.linear`` (exactly ``nn.Linear``), so it is never more than the cost of the zero check
(one pass over x) slower than dense. The defaults are the break-even points measured by
``launch/bench_sparse_linear.py`` on CPU; ``min_sparsity="auto"`` measures the break-even for
the layer's shape on first use (``measure_break_even``).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_MIN_SPARSITY",
    "SparseInputLinear",
    "active_features",
    "sparse_input_linear",
]

log = logging.getLogger(__name__)

InputGrad = Literal["full", "active"]

#: Default break-even feature sparsity per input-gradient mode (measured on CPU, batch 512,
#: 2048x2048; see docs/sparsity.md). Below it the dense path is faster.
DEFAULT_MIN_SPARSITY: dict[str, float] = {"active": 0.25, "full": 0.3}

# (device type, dtype, batch, in, out, input_grad) -> measured break-even, for "auto".
_BREAK_EVEN_CACHE: dict[tuple[Any, ...], float] = {}


@torch.no_grad()
def active_features(x: Tensor) -> Tensor:
    """Sorted indices of the columns of a 2-D ``x`` with a nonzero entry (NaN counts).

    Column max and min: about 4x cheaper on CPU than ``(x != 0).any(0)``, which materializes
    a bool copy of x, and than ``torch.aminmax``.
    """
    return ((x.amax(dim=0) != 0) | (x.amin(dim=0) != 0)).nonzero().squeeze(1)


def _scatter_columns(values: Tensor, idx: Tensor, columns: int) -> Tensor:
    """A zero ``(rows, columns)`` tensor with ``values`` (rows, k) in the columns ``idx``.

    ``scatter_`` with an expanded (stride-0) index: up to 3x faster on CPU than
    ``index_copy_`` along dim 1 for large k.
    """
    out = values.new_zeros(values.shape[0], columns)
    return out.scatter_(1, idx.expand(values.shape[0], -1), values)


class _SparseInputLinearFn(torch.autograd.Function):
    """y = x[:, idx] @ W[:, idx].T + b with gradients scattered back to full shapes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor,
                full_input_grad: bool) -> Tensor:
        xs = x.index_select(1, idx)  # (N, k)
        ws = weight.index_select(1, idx)  # (out, k)
        y = torch.addmm(bias, xs, ws.t()) if bias is not None else xs @ ws.t()
        ctx.full_input_grad = full_input_grad
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        ctx.save_for_backward(xs, ws, idx, weight if full_input_grad else None)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        xs, ws, idx, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if ctx.full_input_grad:
                gx = gy @ weight
            else:
                gx = _scatter_columns(gy @ ws, idx, ctx.x_shape[1])
        if ctx.needs_input_grad[1]:
            gw = _scatter_columns(gy.t() @ xs, idx, ctx.x_shape[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(0)
        return gx, gw, gb, None, None


def sparse_input_linear(x: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor, *,
                        input_grad: InputGrad = "full") -> Tensor:
    """``F.linear`` restricted to the input features ``idx`` (the others must be zero).

    ``x`` is ``(N, in)``; the result is ``(N, out)``. See the module docstring.
    """
    return _SparseInputLinearFn.apply(x, weight, bias, idx, input_grad == "full")


class SparseInputLinear(nn.Linear):
    """Drop-in ``nn.Linear`` that skips input features zero across the whole batch.

    Same parameters and ``state_dict`` as ``nn.Linear``. Extra args:
        min_sparsity: fraction of batch-wide zero input features from which the sparse path
            runs (below it: dense ``F.linear``); a float in [0, 1], None = the measured
            default for ``input_grad`` (``DEFAULT_MIN_SPARSITY``), ``"auto"`` = measure for
            this shape and batch on first use. 1.0 = always dense.
        input_grad: ``"full"`` (exact input gradient) or ``"active"`` (zero for inactive
            features; exact after ReLU/TopK, see the module docstring).

    After each forward, ``last_feature_sparsity`` holds the measured fraction of batch-wide
    zero input features and ``last_sparse`` whether the sparse path ran.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = None, *,
                 min_sparsity: float | Literal["auto"] | None = None,
                 input_grad: InputGrad = "full") -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        if input_grad not in ("full", "active"):
            raise ValueError(f"act.input_grad must be 'full' or 'active', got {input_grad!r}")
        if min_sparsity is not None and min_sparsity != "auto" and (
                isinstance(min_sparsity, bool) or not isinstance(min_sparsity, int | float)
                or not 0.0 <= min_sparsity <= 1.0):
            raise ValueError(
                f"act.min_sparsity must be a fraction in [0, 1], 'auto' or null (measured "
                f"default), got {min_sparsity!r}"
            )
        self.input_grad: InputGrad = input_grad
        self.min_sparsity = min_sparsity
        self.last_feature_sparsity: float | None = None
        self.last_sparse = False

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
                f"input_grad={self.input_grad!r}")

    def threshold(self, batch: int, x: Tensor) -> float:
        """Feature sparsity from which the sparse path runs, for this input."""
        if self.min_sparsity is None:
            return DEFAULT_MIN_SPARSITY[self.input_grad]
        if self.min_sparsity != "auto":
            return float(self.min_sparsity)
        key = (x.device.type, x.dtype, batch, self.in_features, self.out_features,
               self.input_grad)
        if key not in _BREAK_EVEN_CACHE:
            from dgc.activation.break_even import measure_break_even

            _BREAK_EVEN_CACHE[key] = measure_break_even(
                batch=batch, in_features=self.in_features, out_features=self.out_features,
                input_grad=self.input_grad, device=x.device, dtype=x.dtype,
            ).break_even
            log.info("SparseInputLinear break-even for %s: %.2f", key, _BREAK_EVEN_CACHE[key])
        return _BREAK_EVEN_CACHE[key]

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        n = x2.shape[0]
        if n == 0:
            self.last_sparse = False
            return F.linear(x, self.weight, self.bias)
        idx = active_features(x2)
        sparsity = 1.0 - idx.numel() / self.in_features
        self.last_feature_sparsity = sparsity
        threshold = self.threshold(n, x)
        self.last_sparse = 0 < sparsity and threshold < 1.0 and sparsity >= threshold
        if not self.last_sparse:
            return F.linear(x, self.weight, self.bias)
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
