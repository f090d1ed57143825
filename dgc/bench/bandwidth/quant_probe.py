"""The quantized methods' codec time: one of N workers' work in one process, the network looped back.

The codec column (``codec_s``, docs/bandwidth.md) times every method on a one-rank process group.
There the quantized hook (:func:`dgc.quant.quant_hook`) takes the one-worker path
(:func:`dgc.quant.transport.single`) and quantizes nothing. For a run of ``N`` processes the
benchmark runs instead, in the one process, what one of the ``N`` workers computes:

* :class:`ProbeState`: a :class:`dgc.quant.QuantState` that is rank 0 of ``N`` workers (its
  buckets are cut into ``N`` shards, its messages and statistics are those of ``N`` workers);
* :func:`probe_hook`: a DDP comm hook that calls the real hook's :mod:`dgc.quant.transport`
  functions (``prepare``, ``encode``, ``reduce``, ``decode``) with the two collectives looped back:
  the all-to-all receives this worker's own messages, as if every peer had sent the same, and the
  all-gather receives this worker's reduced message ``N`` times.

So per bucket it quantizes ``N - 1`` shards, dequantizes ``N - 1`` messages, averages and
requantizes its own shard, dequantizes ``N`` messages and keeps both phases' residuals, as a worker
of the real run does; only the bytes do not travel. The gradient it leaves is not an average of
anything (the looped-back messages hold other shards' values): the probe is for timing, not for
training. :class:`ProbeCommunication` attaches it where the benchmark builds the method
(``MethodContext.codec_world_size``).
"""

# No `from __future__ import annotations`: DDP inspects the annotation of `bucket` at runtime.

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dgc.quant import QuantConfig, QuantState, transport
from dgc.quant.state import BucketLayout
from dgc.quant.transport import Bucket
from dgc.training.quant_communication import QuantCommunication

__all__ = ["ProbeCommunication", "ProbeState", "loopback_all_gather", "loopback_all_to_all",
           "probe_hook"]


class ProbeState(QuantState):
    """:class:`QuantState` of rank 0 of ``world_size`` workers, whatever the process group.

    Args:
        config: the method's :class:`~dgc.quant.QuantConfig`.
        named_parameters: the model's ``named_parameters()``.
        world_size: the workers of the run it stands for, >= 2 (with one worker the real hook's
            one-worker path is what runs: build :class:`QuantState` instead).
    """

    def __init__(self, config: QuantConfig, named_parameters: Iterable[tuple[str, nn.Parameter]],
                 world_size: int) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 2:
            raise ValueError(f"world_size = {world_size!r}: the probe stands for one of N >= 2 "
                             "workers; with one worker use QuantState and quant_hook (no probe).")
        super().__init__(config, named_parameters)
        self.world_size = world_size
        self.rank = 0


def loopback_all_to_all(messages: Tensor) -> Tensor:
    """What the all-to-all would deliver if every peer sent this worker's own messages."""
    return messages.clone()


def loopback_all_gather(message: Tensor, world_size: int) -> Tensor:
    """What the all-gather would deliver if every owner sent this worker's reduced message."""
    return message.repeat(world_size)


def probe_hook(state: ProbeState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """One of ``state.world_size`` workers' work on ``bucket``, the collectives looped back."""
    buffer = bucket.buffer()
    params = bucket.parameters()
    trip = transport.prepare(state, bucket.index(), state.layout(params), buffer)
    if state.failed is not None:  # an earlier bucket of this step failed
        state.fail(trip.layout, trip.corrected, trip.finite, state.failed)
    else:
        _exchange(state, trip)
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    state.track(buffer, params, fut)
    if bucket.is_last():
        _end_step(state, trip.layout)
    return fut


def _exchange(state: ProbeState, trip: Bucket) -> None:
    shards = transport.encode(state, trip)
    reduced = transport.reduce(state, trip, shards, loopback_all_to_all(shards.messages))
    if reduced is not None:
        transport.decode(state, trip, loopback_all_gather(reduced.message, state.world_size))


def _end_step(state: ProbeState, layout: BucketLayout) -> None:
    """Settle the step as the real hook does: a non-finite gradient fails it (zero or NaN
    gradients, ``NonFiniteGradientError`` with ``nonfinite="raise"``)."""
    failed = state.failed
    if failed is None:
        state.end_step()
        return
    propagate = state.config.nonfinite == "propagate"
    state.fill_step(float("nan") if propagate else 0.0)
    state.end_step(failed=True)
    if not propagate:
        raise transport.nonfinite_error(state, failed, layout.names)


class ProbeCommunication(QuantCommunication):
    """The method's :class:`QuantCommunication` with :class:`ProbeState` + :func:`probe_hook`
    attached instead of the real hook (DDP only: the benchmark's codec runs).

    Args:
        config: the method's :class:`~dgc.quant.QuantConfig`.
        name: the method's name.
        world_size: the processes of the run whose codec is measured, >= 2.
    """

    def __init__(self, *, config: QuantConfig, name: str, world_size: int) -> None:
        super().__init__(config=config, name=name)
        self.world_size = world_size

    def attach_ddp(self, ddp_model: nn.parallel.DistributedDataParallel,
                   optimizer: torch.optim.Optimizer) -> None:
        self._state = ProbeState(self.quant_config, ddp_model.module.named_parameters(),
                                 self.world_size)
        ddp_model.register_comm_hook(self._state, probe_hook)

    def wrap_horovod(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        raise ValueError(f"{self.name}: the benchmark's codec probe runs under DDP only; build "
                         "QuantCommunication for dist=horovod.")
