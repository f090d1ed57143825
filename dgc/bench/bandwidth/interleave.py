"""Every method attached at once and stepped in turn (``RunOptions.interleave``, ``--interleave``).

On a machine shared with other work the load changes over minutes; methods measured one after the
other then see different machines.  Here each method gets its own DDP model up front, all warm up
together (as many steps as the slowest to settle needs, e.g. ``dgc-auto``'s decisions), then measured
step ``s`` of every method runs before step ``s + 1`` of any: a busy minute slows them all alike, and
the medians compare like with like.  Bytes on the wire come from the interface counters around each
measured step (a barrier on both sides, one barrier's traffic subtracted).  Costs the memory of all
methods' models and states at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .counting import counting_group
from .interface import InterfaceBytes, barrier_traffic, default_iface, interface_bytes
from .methods import MethodSpec
from .options import RunOptions
from .replay import replay as replay_ops
from .results import MethodResult
from .stepping import AttachedMethod, StepRecords, attach, measure_step, sync

__all__ = ["run_interleaved"]


def run_interleaved(
    specs: Sequence[MethodSpec],
    opts: RunOptions,
    *,
    device: torch.device,
    direction: list[torch.Tensor] | None,
    result: Callable[[AttachedMethod, StepRecords, int], MethodResult],
) -> Iterator[MethodResult]:
    """Yield one :class:`MethodResult` per method (in ``specs`` order) after all were measured
    interleaved; ``result`` turns a method's records into its result (the runner's)."""
    n, rank = dist.get_world_size(), dist.get_rank()
    iface = opts.iface or default_iface(counting_group().inner_backend)
    runs = [attach(spec, opts, device, rank, direction) for spec in specs]
    warmup = max(opts.warmup, *(s.warmup for s in specs))
    for _ in range(warmup):
        for run in runs:
            dist.barrier()
            run.step()
    sync(device)
    one_barrier = barrier_traffic(iface, 8)
    records = [StepRecords() for _ in runs]
    moved = [InterfaceBytes(rx=0, tx=0) for _ in runs]
    for _ in range(opts.steps):
        for run, rec, i in zip(runs, records, range(len(runs)), strict=True):
            before = interface_bytes(iface)
            measure_step(run, rec, device)  # starts with a barrier
            dist.barrier()
            moved[i] = moved[i] + (interface_bytes(iface) - before)
    for run, rec, total in zip(runs, records, moved, strict=True):
        res = result(run, rec, n)
        res.rx_bytes = total.rx / opts.steps - 2 * one_barrier.rx / 8
        res.tx_bytes = total.tx / opts.steps - 2 * one_barrier.tx / 8
        res.barrier_tx_bytes = 2 * one_barrier.tx / 8
        if opts.replay:
            res.comm_replay_s = replay_ops(res.ops, device, opts.replay, opts.replay_budget_s)
        yield res
