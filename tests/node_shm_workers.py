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
    """tests/reliability_workers.hierarchy (nodes [0, 1] and [2, 3]), counting the calls of the shared-memory
    stage (every call posts, pipelined or not; ``other_host``: ranks 1 and 3 claim other host names, so
    neither node is on one host)."""
    if other_host and rank % 2:
        socket.gethostname = lambda: f"another-host-{rank}"
    calls = []
    post = node_shm.NodeShm.post

    def counted(self: NodeShm, shares, buffer):  # noqa: ANN001, ANN202
        calls.append(buffer.numel())
        return post(self, shares, buffer)

    node_shm.NodeShm.post = counted
    try:
        out = hierarchy(rank, world, cfg)
    except RuntimeError as exc:
        return {"error": str(exc)}
    out["shm_calls"] = len(calls)
    return out


def posted_late(rank: int, world: int) -> dict:
    """Two processes, one node: rank 1 posts 0.5 s late.  Rank 0 posts two calls without waiting (its
    first call not ready until rank 1 posts), then completes both; the order rules are enforced."""
    import time

    shm = NodeShm.open(None, 0, rank, world)
    gen = torch.Generator().manual_seed(7)
    buffers = [[torch.randn(5000, generator=gen) for _ in range(world)] for _ in range(3)]
    shares = [random_shares(5000, world, gen) for _ in range(3)]
    bufs = [b[rank].clone() for b in buffers]
    out: dict = {}
    if rank == 1:
        time.sleep(0.5)
    t0 = time.monotonic()
    first = shm.post(shares[0], bufs[0])
    out["ready_at_once"] = shm.ready(first)
    second = shm.post(shares[1], bufs[1])  # call 0 still open: allowed (one call behind)
    out["posting_s"] = time.monotonic() - t0
    try:
        shm.post(shares[2], bufs[2])  # call 0 still open: two behind
    except RuntimeError as exc:
        out["two_behind"] = str(exc)
    try:
        shm.complete(second)
    except RuntimeError as exc:
        out["out_of_order"] = str(exc)
    shm.complete(first)
    shm.complete(second)
    shm.reduce(shares[2], bufs[2])
    out["equal"] = [torch.equal(bufs[i], reduce_reference(shares[i], buffers[i], rank)) for i in range(3)]
    out["waits"] = shm.waits
    return out


def peer_gone(rank: int, world: int) -> dict:
    """Two processes, one node; rank 1 never posts, and rank 0 sees it as a dead process (its pid replaced
    by one that has exited): rank 0's wait raises within seconds, naming it, instead of hanging."""
    import subprocess
    import sys
    import time

    import torch.distributed as dist

    shm = NodeShm.open(None, 0, rank, world)
    out: dict = {}
    if rank == 0:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        shm.pids[1] = gone.pid
        buf = torch.ones(100)
        posted = shm.post(random_shares(100, world, torch.Generator().manual_seed(0)), buf)
        t0 = time.monotonic()
        try:
            shm.complete(posted)
        except RuntimeError as exc:
            out["error"] = str(exc)
        out["seconds"] = time.monotonic() - t0
    dist.barrier()  # rank 1 waits here, without posting
    return out


def pipelined_hook(rank: int, world: int) -> dict:
    """hierarchy="node" on 2 nodes of 2, two buckets, both sparse: at step 2, local rank 1
    of node 0 starts its backward 0.4 s late.  Records when each shared-memory call completed (the number
    of calls posted by then: pipelined, a call completes at a later hook call than the one that posted
    it) and the final parameters."""
    import time

    from reliability_workers import MODELS, NODES, _data
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dgc
    from dgc.hierarchy_dist import TorchNodeTopology

    completed: list[tuple[int, int]] = []  # (call posted, calls posted when it completed)
    complete = TorchNodeTopology.complete

    def recorded(self, state, layout, posted, buffer):  # noqa: ANN001, ANN202
        result = complete(self, state, layout, posted, buffer)
        assert self._shm is not None
        completed.append((posted.posted.call, self._shm.calls))
        return result

    TorchNodeTopology.complete = recorded
    torch.manual_seed(0)
    ddp = DDP(MODELS["big"](), bucket_cap_mb=0.003)  # after step 1: [b2, w2] and [b1, w1], both sparse
    opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
    cfg = dgc.DGCConfig(density=0.25, min_compress_numel=1, dense_steps=1, hierarchy="node")
    state = dgc.register(ddp, opt, cfg, node_groups=NODES)
    for step, ((x, y),) in enumerate(_data(rank, 4, 1)):
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        if step == 2 and rank == 1:
            time.sleep(0.4)
        loss.backward()
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in ddp.module.named_parameters()},
            "completed": completed, "sparse": state.stats.sparse_buckets}
