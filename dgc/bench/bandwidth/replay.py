"""Communication time alone: a step's recorded collectives replayed one after another."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["replay"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _buffers(ops: Sequence[dict[str, Any]], device: torch.device) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    buffers = []
    for op in ops:
        if op["op"] not in ("all_reduce", "all_gather_single", "all_to_all_single", "broadcast"):
            raise ValueError(f"replay: collective {op['op']!r} is not one a step's hooks launch "
                             "(all_reduce, all_gather_single, all_to_all_single, broadcast: "
                             "policy='auto' sends its decisions from rank 0); record only the "
                             "measured steps")
        dtype = getattr(torch, op["dtype"])
        buffers.append((
            op["op"],
            torch.zeros(op["in_numel"], dtype=dtype, device=device),
            torch.zeros(op["out_numel"], dtype=dtype, device=device),
        ))
    return buffers


def replay(ops: Sequence[dict[str, Any]], device: torch.device, repeats: int,
           budget_s: float = 1.0, max_repeats: int = 30) -> float:
    """Seconds the collectives ``ops`` (``CollectiveRecord.to_dict()``) take on the default group,
    one after another (PowerSGD's Q allreduce needs its P allreduce's result; for hooks whose
    buckets overlap this is an upper bound).

    Best of at least ``repeats`` rounds, more for fast ones (as many as fit in ``budget_s``, at
    most ``max_repeats``): other processes on the machine only ever add to the time. The first
    round warms the transport up and sets the count, agreed by all ranks (a MAX allreduce), since
    every rank must run the same collectives. Every rank calls it with the same ``ops``."""
    if not ops:
        return 0.0
    buffers = _buffers(ops, device)

    def round_s() -> float:
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        for kind, inp, out in buffers:
            if kind == "all_reduce":
                dist.all_reduce(inp)
            elif kind == "broadcast":
                dist.broadcast(inp, src=0)
            elif kind == "all_to_all_single":
                dist.all_to_all_single(out, inp)
            else:
                dist.all_gather_single(out, inp)
        _sync(device)
        return time.perf_counter() - t0

    first = torch.tensor([round_s()], dtype=torch.float64, device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MAX)
    count = min(max_repeats, max(repeats, math.ceil(budget_s / max(float(first), 1e-6))))
    return min(round_s() for _ in range(count))
