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
phase 2 does overlap.  What the phases compute is in :mod:`dgc.quant.transport`, shared with the
Horovod transport (:mod:`dgc.quant.horovod`).
"""

# No `from __future__ import annotations`: DDP inspects the annotation of `bucket` at runtime.

import torch
import torch.distributed as dist
from torch import Tensor

from . import transport
from .state import BucketLayout, QuantState
from .transport import Bucket

__all__ = ["quant_hook"]


def quant_hook(state: QuantState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average ``bucket`` across workers with quantized messages; returns a Future of the buffer."""
    buffer = bucket.buffer()
    params = bucket.parameters()
    trip = transport.prepare(state, bucket.index(), state.layout(params), buffer)
    if state.world_size == 1:
        transport.single(state, trip)
        fut = _done(buffer)
    elif state.failed is not None:  # an earlier bucket of this step failed on some rank
        state.fail(trip.layout, trip.corrected, trip.finite, state.failed)
        fut = _done(buffer)
    else:
        fut = _exchange(state, trip)
    state.track(buffer, params, fut)
    if bucket.is_last():
        _end_step(state, trip.layout)
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
    if not propagate:
        raise transport.nonfinite_error(state, failed, layout.names)


def _exchange(state: QuantState, trip: Bucket) -> torch.futures.Future[Tensor]:
    # Phase 1, synchronous: every rank learns here whether any rank's gradient is non-finite.
    shards = transport.encode(state, trip)
    received = torch.empty_like(shards.messages)
    dist.all_to_all_single(received, shards.messages, group=state.process_group)
    reduced = transport.reduce(state, trip, shards, received)
    if reduced is None:
        return _done(trip.buffer)
    # Phase 2: launch the all-gather of the requantized own shard from here.
    gathered = torch.empty(state.world_size * trip.plan.message_bytes, dtype=torch.uint8,
                           device=trip.buffer.device)
    work = _all_gather(gathered, reduced.message, state.process_group)

    def finish(fut: torch.futures.Future) -> Tensor:
        fut.value()  # re-raises a failed collective
        return transport.decode(state, trip, gathered)

    return work.get_future().then(finish)


def _all_gather(out: Tensor, inp: Tensor, group: dist.ProcessGroup | None) -> dist.Work:
    # all_gather_single (torch >= 2.10) replaces the deprecated all_gather_into_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, inp, group=group, async_op=True)


def _done(buffer: Tensor) -> torch.futures.Future[Tensor]:
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    return fut
