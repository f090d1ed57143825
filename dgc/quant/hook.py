"""The quantized compressors as a DDP communication hook:
``ddp_model.register_comm_hook(dgc.quant.QuantState(cfg, model.named_parameters()), dgc.quant.quant_hook)``.

Per bucket (a flat buffer of local gradients, not yet averaged), a two-phase exchange that scales
like an allreduce (see :mod:`dgc.quant.exchange` and docs/quantization.md):

    phase 1  quantize the shard of every other worker (gradient + residual), ``all_to_all_single``
             of fixed-size uint8 messages, WAITED FOR inside the hook;
    phase 2  average the received contributions to the own shard, quantize the average, launch
             ``all_gather_single`` asynchronously and return its future, whose callback only
             dequantizes.

Both collectives are issued from the hook call itself, never from a ``Future.then`` callback: on
gloo the callbacks of different buckets run in different orders on different ranks and the
collectives they issue pair the wrong messages (what breaks PyTorch's PowerSGD hook on gloo; see
docs/algorithm.md#collectives-from-the-hook-call).  The price: phase 1 blocks the backward pass
for one round trip per bucket (no overlap of phase 1 with the gradients still being computed);
phase 2 does overlap.
"""

# No `from __future__ import annotations`: DDP inspects the annotation of `bucket` at runtime.

import torch
import torch.distributed as dist
from torch import Tensor

from dgc.errors import NonFiniteGradientError

from .exchange import ExchangePlan, decode_gathered, encode_shards, nonfinite_senders, reduce_shard
from .state import BucketLayout, QuantState

__all__ = ["quant_hook"]


def quant_hook(state: QuantState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average ``bucket`` across workers with quantized messages; returns a Future of the buffer."""
    buffer = bucket.buffer()
    params = bucket.parameters()
    layout = state.layout(params)
    plan = ExchangePlan.of(buffer.numel(), state.world_size, state.quantizer)
    corrected = state.corrected(layout, plan, buffer)
    finite = state.finite(buffer)
    if state.world_size == 1:
        fut = _single(state, layout, buffer, corrected, finite)
    elif state.failed is not None:  # an earlier bucket of this step failed on some rank
        state.fail(layout, corrected, finite, state.failed)
        fut = _done(buffer)
    else:
        fut = _exchange(state, bucket.index(), layout, plan, buffer, corrected, finite)
    state.track(buffer, params, fut)
    if bucket.is_last():
        _end_step(state, layout)
    return fut


def _end_step(state: QuantState, layout: BucketLayout) -> None:
    """The last bucket's call settles the step: a failed step (some rank's gradient was not finite)
    leaves the same gradients on every rank, zero (then ``NonFiniteGradientError`` leaves
    ``backward()``) or NaN (``nonfinite="propagate"``, for GradScaler), and is not counted."""
    failed = state.failed
    if failed is None:
        state.end_step()
        return
    propagate = state.config.nonfinite == "propagate"
    state.fill_step(float("nan") if propagate else 0.0)  # waits for in-flight buckets first
    state.end_step(failed=True)
    if propagate:
        return
    kept = ("every residual keeps the step's gradient" if state.config.error_feedback
            else "error feedback is off, so the step's gradient is dropped")
    shown = ", ".join(layout.names[:4]) + (" ..." if len(layout.names) > 4 else "")
    raise NonFiniteGradientError(
        f"quant ({state.config.method}): non-finite gradient from rank(s) {failed} at step "
        f"{state.step} (last bucket: [{shown}]). No update was applied, {kept}, and every rank's "
        "gradients were set to zero. Lower the learning rate or clip gradients, or set "
        "QuantConfig(nonfinite='propagate') to hand NaN to torch.amp.GradScaler.")


def _exchange(state: QuantState, index: int, layout: BucketLayout, plan: ExchangePlan,
              buffer: Tensor, corrected: Tensor, finite: bool) -> torch.futures.Future[Tensor]:
    q, n, rank, b = state.quantizer, state.world_size, state.rank, plan.message_bytes
    dense = buffer.numel() * buffer.element_size()
    # Phase 1, synchronous: every rank learns here whether any rank's gradient is non-finite.
    shards = encode_shards(plan, q, corrected, rank, finite=finite,
                           generator=state.generator(index, 1, buffer.device))
    received = torch.empty_like(shards.messages)
    dist.all_to_all_single(received, shards.messages, group=state.process_group)
    bad = nonfinite_senders(plan, received)
    if bad:
        state.record(sent=(n - 1) * b, received=n * b, network=(n - 1) * b, dense=dense,
                     elements=buffer.numel(), elements_sent=0)
        state.fail(layout, corrected, finite, bad)
        return _done(buffer)
    # Phase 2: reduce the own shard, requantize, and launch the all-gather from here.
    own = corrected[plan.span(rank)]
    reduced = reduce_shard(plan, q, received, own, rank,
                           generator=state.generator(index, 2, buffer.device))
    if state.config.error_feedback:
        residual = corrected - shards.sent
        residual[plan.span(rank)] = (reduced.average - reduced.delivered).mul_(n)
        state.store(layout, residual)
        state.log(layout, corrected)
    state.record(sent=n * b, received=2 * n * b, network=2 * (n - 1) * b, dense=dense,
                 elements=buffer.numel(), elements_sent=buffer.numel())
    gathered = torch.empty(n * b, dtype=torch.uint8, device=buffer.device)
    work = _all_gather(gathered, reduced.message, state.process_group)

    def finish(fut: torch.futures.Future) -> Tensor:
        fut.value()  # re-raises a failed collective
        buffer.copy_(decode_gathered(plan, q, gathered))
        return buffer

    return work.get_future().then(finish)


def _all_gather(out: Tensor, inp: Tensor, group: dist.ProcessGroup | None) -> dist.Work:
    # all_gather_single (torch >= 2.10) replaces the deprecated all_gather_into_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, inp, group=group, async_op=True)


def _single(state: QuantState, layout: BucketLayout, buffer: Tensor, corrected: Tensor,
            finite: bool) -> torch.futures.Future[Tensor]:
    """One worker: nothing to send; the gradient (plus any residual) is used exactly."""
    if not finite:
        state.fail(layout, corrected, finite, [0])
        return _done(buffer)
    buffer.copy_(corrected[: buffer.numel()])
    for name in layout.names:
        state.residuals.pop(name, None)
    return _done(buffer)


def _done(buffer: Tensor) -> torch.futures.Future[Tensor]:
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    return fut
