"""The sparse-input product: ``F.linear`` over the input features that are nonzero in the batch.

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

- ``input_grad="full"`` (default): equal to ``nn.Linear``'s, but one of the three products
  stays dense, so the speed-up is bounded by 3x (about 2x at 90% measured).
- ``input_grad="active"``: the gradient of the inactive features is set to zero (on the
  active ones it is ``nn.Linear``'s), so all three products shrink and the layer runs up to
  ~1/(1-s) faster. ``x.grad`` itself then differs from ``nn.Linear``'s, but every gradient
  *upstream* of x is unchanged whenever each zero of x is a locally constant zero of its
  producer: x = f(z) with df/dz = 0 wherever f(z) = 0, so the chain rule multiplies the
  dropped entries by zero (also when x has other consumers: their gradients are added
  before that multiplication). True for ReLU and ReLU6 (PyTorch's derivative at 0
  is 0), ``TopKActivation`` (dropped entries get no gradient), and Dropout, Flatten, Identity
  or max-pooling after one of them; and trivially when nothing upstream needs a gradient.
  Not exact when the last op before the layer has nonzero derivative at its zeros
  (LeakyReLU, GELU, SiLU, tanh, BatchNorm, a residual sum, data zeros such as one-hot or
  padded inputs that require grad), nor for code that reads ``x.grad`` or hooks on x.
  ``convert_to_sparse_input(input_grad="auto")`` picks it only where it is exact.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["InputGrad", "active_features", "sparse_input_linear"]

InputGrad = Literal["full", "active"]
"""Input gradient of the sparse path: ``"full"`` (exact) or ``"active"`` (zero outside the active features)."""


@torch.no_grad()
def active_features(x: Tensor) -> Tensor:
    """Sorted indices of the columns of a 2-D ``x`` with a nonzero entry (NaN counts).

    Column max and min: about 4x cheaper on CPU than ``(x != 0).any(0)``, which materializes
    a bool copy of x, and than ``torch.aminmax`` or an inf-norm. On CUDA, ``nonzero`` waits
    for the device (a host sync).
    """
    return ((x.amax(dim=0) != 0) | (x.amin(dim=0) != 0)).nonzero().squeeze(1)


def _scatter_columns(values: Tensor, idx: Tensor, columns: int) -> Tensor:
    """A zero ``(rows, columns)`` tensor with ``values`` (rows, k) in the columns ``idx``.

    ``index_copy_`` along dim 1 for a few columns (k < columns / 4: ~10% faster), else
    ``scatter_`` with an expanded (stride-0) index (up to 1.5x faster than ``index_copy_``
    for large k). Measured on CPU, 1 and 2 threads, 512 and 2048 rows.
    """
    out = values.new_zeros(values.shape[0], columns)
    if 4 * idx.numel() < columns:
        return out.index_copy_(1, idx, values)
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
