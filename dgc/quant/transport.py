"""One bucket's trip through the two-phase exchange, whatever carries the bytes.

The DDP hook (:mod:`dgc.quant.hook`, ``torch.distributed``) and the Horovod optimizer
(:mod:`dgc.quant.horovod`, ``hvd.alltoall``/``hvd.allgather``) are thin transports around these
functions; everything they compute (the corrected gradient, the messages, the residuals of both
phases, the statistics, the failure of a step) is computed here, on the :class:`QuantState`::

    bucket = prepare(state, index, state.layout(params), flat_gradient)
    if state.world_size == 1:        single(state, bucket)           # nothing to send
    messages = encode(state, bucket)                                  # phase 1 out
    received = <all-to-all of messages.messages>
    reduced = reduce(state, bucket, messages, received)               # None: the step failed
    gathered = <all-gather of reduced.message>
    averaged = decode(state, bucket, gathered)                        # phase 2 in

A transport must run every rank's collectives in the same order, and settle the step (every bucket
done) with :func:`nonfinite_error` when ``state.failed`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dgc.errors import NonFiniteGradientError

from .exchange import (
    ExchangePlan,
    Reduced,
    Shards,
    decode_gathered,
    encode_shards,
    nonfinite_senders,
    reduce_shard,
)
from .state import BucketLayout, QuantState

__all__ = ["Bucket", "decode", "encode", "nonfinite_error", "prepare", "reduce", "single"]


@dataclass(frozen=True, slots=True)
class Bucket:
    """A flat buffer of local gradients on its way through the exchange."""

    index: int
    """The bucket's index in the step, the same on every rank (keys the stochastic rounding)."""
    layout: BucketLayout
    """Which parameters the buffer holds, and where."""
    plan: ExchangePlan
    """Shard and message sizes."""
    buffer: Tensor
    """The local gradients, flat, in their own dtype (receives the average on the way back)."""
    corrected: Tensor
    """float32 ``buffer + residual``, zero-padded to ``plan.padded``."""
    finite: bool
    """Whether ``buffer`` is finite here (always True with ``check_finite=False``)."""


def prepare(state: QuantState, index: int, layout: BucketLayout, buffer: Tensor) -> Bucket:
    """The bucket's plan and corrected gradient (the residuals are read, not changed)."""
    plan = ExchangePlan.of(buffer.numel(), state.world_size, state.quantizer)
    return Bucket(index=index, layout=layout, plan=plan, buffer=buffer,
                  corrected=state.corrected(layout, plan, buffer), finite=state.finite(buffer))


def single(state: QuantState, bucket: Bucket) -> None:
    """One worker: nothing to send; the gradient (plus any residual) is used exactly."""
    if not bucket.finite:
        state.fail(bucket.layout, bucket.corrected, bucket.finite, [0])
        return
    bucket.buffer.copy_(bucket.corrected[: bucket.buffer.numel()])
    for name in bucket.layout.names:
        state.residuals.pop(name, None)


def encode(state: QuantState, bucket: Bucket) -> Shards:
    """Phase 1 out: the messages for the all-to-all (``shards.messages``, uint8)."""
    return encode_shards(bucket.plan, state.quantizer, bucket.corrected, state.rank,
                         finite=bucket.finite,
                         generator=state.generator(bucket.index, 1, bucket.buffer.device))


def reduce(state: QuantState, bucket: Bucket, shards: Shards, received: Tensor) -> Reduced | None:
    """Phase 1 in, phase 2 out: average the own shard and quantize it for the all-gather, keep what
    both phases' rounding lost in the residuals, count the bytes.

    Returns None, and fails the step, when some rank's message carried the non-finite flag or an
    earlier bucket of the step failed (``state.failed``): every rank sees the same flags, so every
    rank skips the all-gather of this bucket alike."""
    n, b = state.world_size, bucket.plan.message_bytes
    dense = bucket.buffer.numel() * bucket.buffer.element_size()
    elements = bucket.buffer.numel()
    bad = nonfinite_senders(bucket.plan, received)
    if bad or state.failed is not None:
        state.record(sent=(n - 1) * b, received=n * b, network=(n - 1) * b, dense=dense,
                     elements=elements, elements_sent=0)
        state.fail(bucket.layout, bucket.corrected, bucket.finite, bad or state.failed)
        return None
    plan, rank = bucket.plan, state.rank
    reduced = reduce_shard(plan, state.quantizer, received, bucket.corrected[plan.span(rank)],
                           rank, generator=state.generator(bucket.index, 2, bucket.buffer.device))
    if state.config.error_feedback:
        residual = bucket.corrected - shards.sent
        residual[plan.span(rank)] = (reduced.average - reduced.delivered).mul_(n)
        state.store(bucket.layout, residual)
        state.log(bucket.layout, bucket.corrected)
    state.record(sent=n * b, received=2 * n * b, network=2 * (n - 1) * b, dense=dense,
                 elements=elements, elements_sent=elements)
    return reduced


def decode(state: QuantState, bucket: Bucket, gathered: Tensor) -> Tensor:
    """Phase 2 in: the averaged gradient, copied into ``bucket.buffer`` (returned)."""
    return bucket.buffer.copy_(decode_gathered(bucket.plan, state.quantizer, gathered))


def nonfinite_error(state: QuantState, failed: list[int],
                    names: tuple[str, ...] | list[str]) -> NonFiniteGradientError:
    """The error a failed step raises (``nonfinite="raise"``): ``failed`` are the ranks whose
    gradient was not finite, ``names`` the tensors of the bucket that settled the step."""
    kept = ("every residual keeps the step's gradient" if state.config.error_feedback
            else "error feedback is off, so the step's gradient is dropped")
    shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
    return NonFiniteGradientError(
        f"quant ({state.config.method}): non-finite gradient from rank(s) {failed} at step "
        f"{state.step} (last bucket: [{shown}]). No update was applied, {kept}, and every rank's "
        "gradients were set to zero. Lower the learning rate or clip gradients, or set "
        "QuantConfig(nonfinite='propagate') to hand NaN to torch.amp.GradScaler.")
