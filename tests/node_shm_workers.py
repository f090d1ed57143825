"""Workers of tests/test_node_shm.py (spawned gloo processes, all on this host)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
from reliability_workers import hierarchy

import dgc.node_shm as node_shm
from dgc.node_shm import NodeShm, reduce_reference


@dataclass(frozen=True)
class Ranges:
    """A share: ranges of bucket positions."""

    offsets: tuple[int, ...]
    numels: tuple[int, ...]


def random_shares(numel: int, size: int, gen: torch.Generator) -> list[Ranges]:
    """``numel`` positions cut into random ranges, each given to a random owner or to nobody (a gap)."""
    cuts = sorted(set(torch.randint(1, numel, (3 * size,), generator=gen).tolist()) | {0, numel})
    spans: list[list[tuple[int, int]]] = [[] for _ in range(size)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        owner = int(torch.randint(0, size + 1, (1,), generator=gen))
        if owner < size:  # size: a gap nobody owns
            spans[owner].append((a, b - a))
    return [Ranges(tuple(o for o, _ in s), tuple(n for _, n in s)) for s in spans]


def reduce_random(rank: int, world: int, dtype: str, numels: list[int], fold: bool = True) -> dict:
    """One node of ``world`` ranks: repeated reduces of random buffers over random shares, against the
    pure-torch reference (exact), and the segments' files gone once mapped.  ``fold``:
    :attr:`NodeShm.fold`; ``unfolded`` says whether each result also has the bits of sum-then-divide."""
    shm = NodeShm.open(None, 0, rank, world)
    shm.fold = fold
    out: dict = {"equal": [], "unfolded": [], "half_bytes": [], "left": []}
    for call, numel in enumerate(numels):
        gen = torch.Generator().manual_seed(1000 + call)
        buffers = [torch.randn(numel, generator=gen).to(getattr(torch, dtype)) for _ in range(world)]
        shares = random_shares(numel, world, gen)
        buf = buffers[rank].clone()
        shm.reduce(shares, buf)
        out["equal"].append(torch.equal(buf, reduce_reference(shares, buffers, rank, fold=fold)))
        out["unfolded"].append(torch.equal(buf, reduce_reference(shares, buffers, rank, fold=False)))
        out["half_bytes"].append(shm.half_bytes)
        out["left"] += [p for p in shm.paths if os.path.exists(p)]
    out["paths"] = list(shm.paths)
    return out


def hierarchy_counted(rank: int, world: int, cfg: dict, other_host: bool = False) -> dict:
    """tests/reliability_workers.hierarchy (nodes [0, 1] and [2, 3]), counting the shared-memory reduces
    (``other_host``: ranks 1 and 3 claim other host names, so neither node is on one host)."""
    if other_host and rank % 2:
        socket.gethostname = lambda: f"another-host-{rank}"
    calls = []
    reduce = node_shm.NodeShm.reduce

    def counted(self: NodeShm, shares, buffer) -> None:  # noqa: ANN001
        calls.append(buffer.numel())
        reduce(self, shares, buffer)

    node_shm.NodeShm.reduce = counted
    try:
        out = hierarchy(rank, world, cfg)
    except RuntimeError as exc:
        return {"error": str(exc)}
    out["shm_calls"] = len(calls)
    return out
