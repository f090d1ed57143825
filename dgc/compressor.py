"""The DGC algorithm for one tensor (Lin et al., ICLR 2018, Algorithm 1 with its four techniques).

Both transports (the DDP hook and the Horovod optimizer) call these two functions, so they compute the
same thing.  Per worker, per tensor, per step, with momentum m:

    Step 0  (optional) weight decay ``g += wd * w`` and local clipping of g to ``clip_norm / sqrt(N)``;
    Step 1  momentum correction  ``u <- m*u + g``            (Nesterov: ``u <- m*(u + g)``, v gets u + g);
    Step 2  local accumulation   ``v <- v + u``;
    Step 3  selection of the k = ceil(density * numel) entries of largest |v|;
    Step 4  packing of (index, value) pairs (values cast to the wire dtype; int8: quantized with one
            scale per tensor, see :mod:`dgc.wire`);
    Step 5  momentum factor masking ``u[sel] <- 0`` and ``v[sel] <- v[sel] - sent`` (0 in float32; the
            rounding error of a narrower wire dtype otherwise).

A dense-path tensor (small tensors always, every tensor during the first ``dense_steps``) runs steps 0-2
and sends all of v, keeping the wire dtype's rounding error in v; its momentum is not masked, which makes
it plain momentum SGD.  If another worker reports a non-finite gradient, nothing of the step is applied
and every worker puts what it packed back into v (:func:`finish_dense`, ``DGCState.restore``).  Invariant,
checked by the tests: sent + v = the sum of all momentum-corrected gradients, for every tensor at every
step (docs/algorithm.md#invariant); "sent" is what the receivers add: the int8 codes times their scale.

int8 values: the kernels select into float32 (v[sel] becomes exactly 0), then :func:`compress` quantizes
the k selected values with ``s = max|value| / 127`` and puts each value's rounding error back into v; a
dense-path tensor sends ``round(v / s)`` with ``s = max|v| / 127`` and :func:`finish_dense` subtracts
exactly ``q * s`` once it arrived.  The error feedback of the residual makes the rounding lossless over
steps, as for float16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from .config import DGCConfig
from .kernels.reference import saturate
from .wire import dequantize_int8, int8_scale, quantize_int8

__all__ = [
    "CompressedTensor",
    "TensorMemory",
    "compress",
    "compress_dense",
    "compress_dense_direct",
    "compress_dense_direct_many",
    "dense_scale",
    "direct_dense_ok",
    "finish_dense",
    "preprocess",
    "undo_direct",
]


@dataclass(kw_only=True, slots=True)
class TensorMemory:
    """Per-parameter internal state of one worker: DGC's momentum ``u`` and residual ``v`` (float32).
    A piece of a parameter (:mod:`dgc.pieces`) has one too, whose tensors are views of the parameter's."""

    name: str
    shape: torch.Size
    compressed: bool
    """Whether this tensor is eligible for sparsification (else it always goes dense)."""
    residual: Tensor
    momentum: Tensor | None
    """None when ``config.momentum == 0``: top-k with error feedback keeps no momentum."""
    mask: Tensor | None = None
    """Static pruning mask (True = live), flat bool; masked entries are never selected or sent."""
    live: int = 0
    """Number of unmasked entries (``numel`` without a mask): the density counts these."""
    zero_mark: tuple[int, int] | None = None
    """``(data_ptr, version)`` of ``residual`` when it was last cleared by :func:`finish_dense`: while
    both still match, v is known to be all zero (see :func:`compress_dense_direct`).  Writers that
    bypass torch's version counter (the compiled kernels, collectives) clear it."""

    def residual_is_zero(self) -> bool:
        """Whether v is known to be all zero (cleared since and not written to)."""
        return self.zero_mark is not None and self.zero_mark == _mark_of(self.residual)

    @property
    def numel(self) -> int:
        return self.residual.numel()

    def k_at(self, density: float) -> int:
        """Pairs sent at ``density``: ``ceil(density * live)``, at least 1 while anything is live."""
        return min(self.live, max(1, math.ceil(density * self.live))) if self.live else 0


@dataclass(kw_only=True, slots=True)
class CompressedTensor:
    """What one worker sends for one tensor: exactly ``k`` pairs (fixed-size messages)."""

    indices: Tensor
    """int32 positions in the flattened tensor, ascending."""
    values: Tensor
    """The residual's values at ``indices``, in the wire dtype (int8: the codes)."""
    numel: int
    shape: torch.Size
    scale: Tensor | None = None
    """int8 wire: the float32 scale (0-dim) of the codes; None for a float wire."""

    @property
    def sent(self) -> Tensor:
        """What the receivers add for these pairs, in float32: ``values`` (int8: times ``scale``)."""
        return self.values.float() if self.scale is None else dequantize_int8(self.values, self.scale)


def preprocess(
    grad: Tensor, param: Tensor | None, config: DGCConfig, world_size: int, fraction: float = 1.0
) -> Tensor:
    """Step 0, in place on ``grad``: weight decay (needs ``param``), then local clipping.  ``fraction``:
    ``grad`` is that share of a tensor's elements (a piece, see :mod:`dgc.pieces`), clipped to the
    limit times ``sqrt(fraction)``, so that the pieces of a tensor together stay within its limit."""
    if config.weight_decay:
        if param is None:
            raise ValueError(
                "DGCConfig.weight_decay > 0 needs the parameter values; pass param= to compress()."
            )
        grad.add_(param.detach().reshape(grad.shape), alpha=config.weight_decay)
    if config.clip_norm is not None:
        # The paper clips each worker's gradient at the global threshold scaled by N^-1/2 (sec. 3.3).
        limit = config.clip_norm * world_size**-0.5
        if fraction != 1.0:
            limit *= fraction**0.5
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        grad.mul_(torch.clamp(limit / (norm + 1e-6), max=1.0).to(grad.dtype))
    return grad


def compress(
    memory: TensorMemory,
    grad: Tensor,
    k: int,
    config: DGCConfig,
    kernels,
    *,
    offset: int = 0,
    out_indices: Tensor | None = None,
    out_values: Tensor | None = None,
) -> CompressedTensor:
    """Steps 1-5 for a compressed tensor (``grad`` already preprocessed).  Writes the pairs into
    ``out_indices``/``out_values`` when given (views into a wire buffer), else into new tensors.

    int8 wire: ``out_values`` must be float32 (default: a new one); it receives the *dequantized* values
    (what was sent), and the returned tensor holds the int8 codes and their scale."""
    memory.zero_mark = None  # the kernels write v through pointers, past torch's version counter
    device = memory.residual.device
    quantized = config.wire_dtype == torch.int8
    if out_indices is None:
        out_indices = torch.empty(k, dtype=torch.int32, device=device)
    if out_values is None:
        out_values = torch.empty(k, dtype=torch.float32 if quantized else config.wire_dtype, device=device)
    if quantized and out_values.dtype != torch.float32:
        raise TypeError(
            f"compress: DGCConfig.value_dtype = 'int8' selects into float32 before quantizing; "
            f"out_values for {memory.name!r} is {out_values.dtype}. Pass a float32 buffer (or none)."
        )
    kernels.compress_step(
        grad.reshape(-1),
        memory.momentum,
        memory.residual,
        beta=config.momentum,
        nesterov=config.nesterov,
        k=k,
        sample_ratio=config.sample_ratio,
        offset=offset,
        momentum_masking=config.momentum_masking,
        out_indices=out_indices,
        out_values=out_values,
        mask=memory.mask,
    )
    if quantized:
        codes, scale = _quantize_selected(memory, out_indices, out_values)
        return CompressedTensor(indices=out_indices, values=codes, numel=memory.numel, shape=memory.shape,
                                scale=scale)
    return CompressedTensor(indices=out_indices, values=out_values, numel=memory.numel, shape=memory.shape)


def _quantize_selected(memory: TensorMemory, indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """int8 step 4-5 after the kernel: codes and scale of the selected float32 ``values``; each value's
    rounding error back into v (where the kernel left exactly 0), and ``values`` replaced by what the
    receivers will add (codes times scale)."""
    scale = int8_scale(values)
    codes = quantize_int8(values, scale)
    sent = dequantize_int8(codes, scale)
    memory.residual.index_add_(0, indices.long(), values - sent)
    values.copy_(sent)
    return codes, scale


def compress_dense(memory: TensorMemory, grad: Tensor, config: DGCConfig, out: Tensor) -> Tensor:
    """Steps 1-2 for a dense-path tensor: v becomes everything to send and ``out`` (any float dtype, may
    alias ``grad``; or int8: the codes of v with scale :func:`dense_scale`) receives a copy: of all of v,
    or, with ``memory.live`` elements, of its live entries only (a pruned tensor's payload without the
    pruned coordinates, which are zero in v anyway).  v keeps it until :func:`finish_dense` learns
    whether it arrived."""
    g = grad.reshape(-1)
    v = memory.residual
    u = memory.momentum
    if memory.mask is not None:
        g = g * memory.mask
    if u is None:
        v.add_(g)
    elif config.nesterov:
        u.add_(g).mul_(config.momentum)
        v.add_(u).add_(g)
    else:
        torch.add(g, u, alpha=config.momentum, out=u)
        v.add_(u)
    flat = out.reshape(-1)
    if flat.numel() == v.numel():
        flat.copy_(_to_wire(v, out.dtype))
    elif memory.mask is not None and flat.numel() == memory.live:  # pruned: the live entries only
        flat.copy_(_to_wire(torch.masked_select(v, memory.mask), out.dtype, scale_of=v))
    else:
        raise ValueError(
            f"compress_dense: out has {flat.numel()} elements for {memory.name!r}, which has {v.numel()} "
            f"({memory.live} live)"
        )
    return out


def direct_dense_ok(memory: TensorMemory, grad: Tensor, config: DGCConfig) -> bool:
    """Whether :func:`compress_dense_direct` may replace :func:`compress_dense` for this tensor: float32
    gradient, momentum on (not Nesterov), no pruning mask, and v known to be all zero."""
    return (
        grad.dtype == torch.float32
        and memory.momentum is not None
        and not config.nesterov
        and memory.mask is None
        and memory.residual_is_zero()
    )


def compress_dense_direct(
    memory: TensorMemory, grad: Tensor, config: DGCConfig, divide: int, kernels: ModuleType
) -> None:
    """:func:`compress_dense` + :func:`finish_dense` for a tensor whose v is zero (see
    :func:`direct_dense_ok`), in one or two passes instead of five: ``u = m u + g`` and
    ``grad = u / divide`` (``kernels.dense_momentum``: one fused pass on the compiled CPU path, the
    twin's two torch operations elsewhere, the same bits).  v = 0 + u would be sent whole and cleared,
    so v is left untouched; the payload is u itself (the values :func:`compress_dense` gives, up to the
    sign of zeros).  A failed step gives it back with :func:`undo_direct`."""
    kernels.dense_momentum(grad.reshape(-1), memory.momentum, config.momentum, divide)


def compress_dense_direct_many(
    grads: Sequence[Tensor], momenta: Sequence[Tensor], config: DGCConfig, divide: int, kernels: ModuleType
) -> None:
    """:func:`compress_dense_direct` for several tensors (flat ``grads``, their memories' ``momenta``) in
    one ``kernels.dense_momentum_many`` call, with the same bits."""
    kernels.dense_momentum_many(grads, momenta, config.momentum, divide)


def undo_direct(memory: TensorMemory) -> None:
    """The step of a :func:`compress_dense_direct` payload failed: v takes what was not delivered (u),
    as :func:`compress_dense` would have left it."""
    memory.residual.add_(memory.momentum)


def _mark_of(v: Tensor) -> tuple[int, int] | None:
    try:
        return v.data_ptr(), v._version
    except RuntimeError:  # an inference tensor keeps no version counter: never "known zero"
        return None


def dense_scale(memory: TensorMemory) -> Tensor:
    """The int8 scale of a dense-path tensor's payload between :func:`compress_dense` and
    :func:`finish_dense`: ``max|v| / 127`` (pruned entries are zero in v, so live ones decide)."""
    return int8_scale(memory.residual)


def _to_wire(x: Tensor, dtype: torch.dtype, scale_of: Tensor | None = None) -> Tensor:
    """``x`` as the wire carries it: saturated to a float dtype, or int8 codes with the scale of
    ``scale_of`` (default ``x``)."""
    if dtype == torch.int8:
        return quantize_int8(x, int8_scale(x if scale_of is None else scale_of))
    return saturate(x, dtype)


def finish_dense(memory: TensorMemory, sent_dtype: torch.dtype, delivered: bool) -> None:
    """After the collective: a delivered payload leaves only its rounding error to ``sent_dtype`` in v;
    an undelivered one (another worker's gradient was not finite) stays whole in v.  (v is unchanged
    since :func:`compress_dense`, so the payload is recomputed from it bit for bit, int8 scale included.)"""
    if not delivered:
        return
    v = memory.residual
    if sent_dtype == torch.float32:
        if not memory.residual_is_zero():
            v.zero_()
            memory.zero_mark = _mark_of(v)
    elif sent_dtype == torch.int8:
        scale = int8_scale(v)
        v.sub_(dequantize_int8(quantize_int8(v, scale), scale))
    else:
        v.sub_(saturate(v, sent_dtype).to(sent_dtype).float())
