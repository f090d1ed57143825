"""Every method attached at once and stepped in turn (``RunOptions.interleave``, ``--interleave``).

On a machine shared with other work the load changes over minutes; methods measured one after the
other then see different machines.  Here each method gets its own DDP model up front, all warm up
together (as many steps as the slowest to settle needs, e.g. ``dgc-auto``'s decisions), then measured
step ``s`` of every method runs before step ``s + 1`` of any, in an order rotated every step
(:func:`rotated`): a busy minute slows them all alike, every method follows every other one equally often, and the
medians compare like with like.  Bytes on the wire come from the interface counters around each
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

__all__ = ["rotated", "run_interleaved"]


def rotated(count: int, step: int) -> list[int]:
    """The methods' order at measured step ``step``: the rows of a balanced Latin square (Williams), so
    every method runs in every place and right after every other method equally often (once per
    ``count`` steps for an even count, twice per ``2 count`` for an odd one): a method that leaves the
    machine busy (gloo threads, evicted caches, e.g. DGC at density 0.25) slows no single method more
    than the others."""
    if count <= 0:
        return []
    base, lo, hi = [0], 1, count - 1
    for i in range(1, count):  # 0, 1, n-1, 2, n-2, ...
        if i % 2:
            base.append(lo)
            lo += 1
        else:
            base.append(hi)
            hi -= 1
    row = step % (count if count % 2 == 0 else 2 * count)
    order = [(x + row) % count for x in base]
    return order[::-1] if row >= count else order


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
    for step in range(opts.steps):
        for i in rotated(len(runs), step):
            run, rec = runs[i], records[i]
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
