"""DGC as a DDP communication hook: ``ddp_model.register_comm_hook(state, dgc.ddp_comm_hook)``.

A thin adapter around :mod:`dgc.compressor`.  Per bucket (a flat buffer of several parameters' local
gradients, not yet divided by the world size):

    Step I    look up the bucket's layout (tensors by parameter *name*; DDP rebuilds buckets after step 1);
    Step II   check the local gradients are finite (the result is shared through the message flags);
    Step III  compress every tensor straight into this worker's fixed-size message (dense steps and
              buckets with no compressible tensor: write the momentum-corrected payload into the buffer);
    Step IV   launch ONE collective from the hook call itself: ``all_gather_single`` of the messages (or
              ``all_reduce`` of the buffer).  Never from a ``Future.then`` callback: callbacks of different
              buckets run in different orders on different ranks, and gloo then pairs the wrong messages
              (what breaks PyTorch's own PowerSGD hook on gloo with many buckets);
    Step V    in the callback, scatter-add everybody's pairs into the buffer and divide by N.

The step is settled as a whole (:mod:`dgc.ledger`): a non-finite gradient in any bucket puts every
bucket's sent values back into the residuals, and the last callback raises once all are settled.
"""

# No `from __future__ import annotations`: DDP inspects the annotation of `bucket` at runtime.

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .ledger import StepLedger
from .state import DGCState
from .wire import FLAG_NONFINITE, BucketLayout, MessageView, pack_pairs, unpack_positions

__all__ = ["ddp_comm_hook"]


def ddp_comm_hook(state: DGCState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average ``bucket`` across workers with Deep Gradient Compression; returns a Future of the buffer."""
    buffer = bucket.buffer()
    # Step I
    layout = state.layout_for(bucket.parameters(), buffer.device)
    state.settle(layout)  # its buffers and residuals are reused below
    ledger = state.ledger()
    ledger.launch(last=bucket.is_last())  # before the collective: its callback may run at once
    # Step II
    finite = state.finite(buffer)
    # Steps III-V
    if layout.compressed:
        fut = _sparse_allgather(state, ledger, layout, buffer, finite)
    else:
        fut = _dense_allreduce(state, ledger, layout, buffer, finite)
    state.track(layout, fut)
    if bucket.is_last():
        state.end_step()
    return fut


def _dense_allreduce(
    state: DGCState, ledger: StepLedger, layout: BucketLayout, buffer: Tensor, finite: bool
) -> torch.futures.Future[Tensor]:
    n = state.world_size
    if finite:
        for name, off, numel in zip(layout.names, layout.offsets, layout.numels, strict=True):
            g = buffer[off : off + numel]
            state.compress_dense(name, g, out=g)
        if state.track_sent:  # the allreduce overwrites the payload: keep a copy
            kept = buffer.clone()
            for name, off, numel in zip(layout.names, layout.offsets, layout.numels, strict=True):
                state.note_sent(name, None, 0, kept[off : off + numel])
    # Pruned coordinates (zero in the payload) stay home: only the live entries are reduced.
    live = state.dense_positions(layout, buffer.device) if layout.dense_numel < buffer.numel() else None
    payload = buffer if live is None else buffer.index_select(0, live)
    state.record(
        sparse=False,
        sent=payload.numel() * payload.element_size(),
        received=payload.numel() * payload.element_size(),
        dense=buffer.numel() * buffer.element_size(),
        elements=buffer.numel(),
        elements_sent=payload.numel(),
    )
    payload.div_(n)
    work = dist.all_reduce(payload, group=state.process_group, async_op=True)

    def finish(fut: torch.futures.Future[list[Tensor]]) -> Tensor:
        result = fut.value()[0]
        if live is not None:
            result = buffer.zero_().index_copy_(0, live, result)
        delivered = state.finite(result)
        commit = _commit_dense(state, layout, layout.names, result.dtype) if finite else None
        # Undelivered dense payloads stay whole in v: nothing to undo.
        failures = ledger.settle(failed=None if delivered else "a worker", commit=commit)
        if not delivered:
            result.fill_(float("nan"))
        return _report(state, layout, failures, result, ledger.step)

    return work.get_future().then(finish)


def _sparse_allgather(
    state: DGCState, ledger: StepLedger, layout: BucketLayout, buffer: Tensor, finite: bool
) -> torch.futures.Future[Tensor]:
    n = state.world_size
    ws = state.workspace(layout, buffer.device, buffer.dtype)
    mine = MessageView.of(ws["message"], layout)
    mine.flags.fill_(0 if finite else FLAG_NONFINITE)
    # int32 positions are selected straight into the message; block16 selects into scratch, then packs.
    positions = ws.get("positions", mine.indices)
    values = ws.get("values", mine.values)
    if finite:
        pair, dense = 0, 0
        for i, (name, off, numel, k) in enumerate(
            zip(layout.names, layout.offsets, layout.numels, layout.ks, strict=True)
        ):
            g = buffer[off : off + numel]
            if k:
                idx = positions[pair : pair + k]
                state.compress(name, g, out_indices=idx, out_values=values[pair : pair + k])
                idx.add_(off)  # positions in the bucket, so receivers need no tensor boundaries
                state.note_sent(name, idx, off, values[pair : pair + k])
                pair += k
            else:
                size = layout.dense_size(i)  # a pruned tensor: its live entries only
                state.compress_dense(name, g, out=mine.dense[dense : dense + size])
                state.note_sent(name, None, 0, mine.dense[dense : dense + size])
                dense += size
        pack_pairs(layout, mine, positions, values)
    msg_bytes = layout.message_bytes
    state.record(
        sparse=True,
        sent=msg_bytes,
        received=n * msg_bytes,
        dense=buffer.numel() * buffer.element_size(),
        elements=buffer.numel(),
        elements_sent=layout.pairs + layout.dense_numel,
    )
    work = _all_gather(ws["gathered"], ws["message"], state.process_group)
    dense_names = [name for name, k in zip(layout.names, layout.ks, strict=True) if k == 0]

    def finish(fut: torch.futures.Future[list[Tensor]]) -> Tensor:
        everyone = MessageView.of(ws["gathered"], layout, n)
        bad = torch.nonzero(everyone.flags.reshape(-1) & FLAG_NONFINITE).reshape(-1).tolist()
        commit = _commit_dense(state, layout, dense_names, layout.wire_dtype) if finite else None
        undo = (lambda: _undo(state, layout, positions, values)) if finite else None
        if bad:
            failures = ledger.settle(failed=f"rank(s) {bad}", commit=commit, undo=undo)
            return _report(state, layout, failures, buffer.fill_(float("nan")), ledger.step)
        out = buffer if buffer.dtype == torch.float32 else ws["accumulator"]
        state.kernels_for(out).scatter_unpack(out, unpack_positions(layout, everyone, n), everyone.values, n)
        if layout.dense_numel:
            dense_sum = everyone.dense.float().sum(dim=0).div_(n)
            out.index_copy_(0, ws["dense_positions"], dense_sum)
        if out is not buffer:
            buffer.copy_(out)
        failures = ledger.settle(failed=None, commit=commit, undo=undo)
        return _report(state, layout, failures, buffer, ledger.step)

    return work.get_future().then(finish)


def _all_gather(out: Tensor, inp: Tensor, group: dist.ProcessGroup | None) -> dist.Work:
    # all_gather_single (torch >= 2.10) replaces the deprecated all_gather_into_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, inp, group=group, async_op=True)


def _commit_dense(
    state: DGCState, layout: BucketLayout, names: list[str] | tuple[str, ...], sent_dtype: torch.dtype
) -> Callable[[], None] | None:
    """What a successful step does for the bucket's dense payloads: clear them from the residuals."""
    if not names:
        return None

    def commit() -> None:
        for name in names:
            state.finish_dense(name, sent_dtype, True)

    return commit


def _undo(state: DGCState, layout: BucketLayout, positions: Tensor, values: Tensor) -> None:
    """The step failed: put this worker's selected pairs back into its residuals (its dense payloads
    were never cleared)."""
    pair = 0
    for name, off, k in zip(layout.names, layout.offsets, layout.ks, strict=True):
        if k:
            idx = positions[pair : pair + k].long() - off
            state.restore(name, idx, values[pair : pair + k])
            pair += k


def _report(state: DGCState, layout: BucketLayout, failures: list[str] | None, buffer: Tensor, step: int) -> Tensor:
    """From the callback that settled a failed step: raise (or, "propagate", return the NaN buffer)."""
    if failures:
        state.forget_sent()
    if failures and state.config.nonfinite == "raise":
        names = ", ".join(layout.names[:4]) + (" ..." if len(layout.names) > 4 else "")
        raise FloatingPointError(
            f"DGC: non-finite gradient from {'; '.join(failures)} at step {step} (last bucket settled: "
            f"[{names}]). No update was applied and every residual was kept. Lower the learning rate "
            "or clip gradients, or set DGCConfig(nonfinite='propagate') to hand NaN to "
            "torch.amp.GradScaler."
        )
    return buffer
