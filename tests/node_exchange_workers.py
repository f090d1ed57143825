"""Workers of tests/test_node_exchange.py (spawned gloo processes): hierarchy="node"'s two-stage gather
on the DDP hook, watched from outside (every all-gather the library issues, every decode)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn
from reliability_workers import BigLinear, _data
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc


class _Gathers:
    """Replaces ``dist.all_gather_single`` (what the hook calls) with a spy recording, for every
    all-gather of bytes, its group's ranks and the bytes this rank put in."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], int]] = []
        self._real = dist.all_gather_single

        def spy(out, inp, group=None, async_op=False):  # noqa: ANN001, ANN202
            if inp.dtype == torch.uint8:
                ranks = dist.get_process_group_ranks(group) if group is not None else list(
                    range(dist.get_world_size()))
                self.calls.append((ranks, inp.numel()))
            return self._real(out, inp, group=group, async_op=async_op)

        dist.all_gather_single = spy


def _across_bytes(calls: list[tuple[list[int], int]], nodes: list[list[int]]) -> int:
    """Bytes this rank sent to ranks of other nodes in ring all-gathers: (g - 1) x its input for a group
    of g ranks that spans nodes (every byte of such a ring goes to every other member)."""
    node_of = {r: i for i, g in enumerate(nodes) for r in g}
    return sum((len(ranks) - 1) * size for ranks, size in calls if len({node_of[r] for r in ranks}) > 1)


def two_stage(rank: int, world: int, nodes: list[list[int]], steps: int = 4) -> dict:
    """Sparse DGC with hierarchy="node" on ``nodes``, a bucket per tensor.  Per step: the bytes sent
    across nodes (the spy's count and the topology's counter) against (n - 1) W per sparse bucket, and
    every decoded bucket against the one-stage result: the same padded messages all-gathered over all
    processes, decoded in rank order."""
    torch.manual_seed(0)
    ddp = DDP(BigLinear(), bucket_cap_mb=0.001)
    opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
    cfg = dgc.DGCConfig(density=0.05, min_compress_numel=16, dense_steps=1, hierarchy="node")
    state = dgc.register(ddp, opt, cfg, node_groups=nodes)
    gathers = _Gathers()
    out: dict = {"across": [], "counter": [], "expected": [], "buckets": [], "rows_equal": [],
                 "decoded_equal": [], "group_sizes": []}
    for (x, y), in _data(rank, steps, 1):
        gathers.calls.clear()
        captured: list[tuple] = []
        topo = getattr(state.transport, "_topology", None)  # built at the first hook call
        if topo is not None:
            _capture(topo, captured)
        before = 0 if topo is None else topo.sent_across
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        topo = state.transport._topology
        out["across"].append(_across_bytes(gathers.calls, topo.nodes))
        out["counter"].append(topo.sent_across - before)
        out["expected"].append(sum((topo.n_nodes - 1) * c[4] for c in captured))
        out["buckets"].append(len(captured))
        out["group_sizes"].append(sorted({len(r) for r, _ in gathers.calls}))
        captured.sort(key=lambda c: c[0])  # launch order: the same on every rank
        rows, decoded = _one_stage(state, topo, captured, world)
        out["rows_equal"].append(rows)
        out["decoded_equal"].append(decoded)
    out["params"] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    return out


def _capture(topo, captured: list[tuple]) -> None:  # noqa: ANN001
    """Record every decode of the step: (its padded message, the gathered rows, the rows' order, width,
    the shares, the decoded bucket), in launch order (decodes run in stage B's callbacks, on gloo
    threads, in any order)."""
    if getattr(topo, "_spied", False):
        topo._captured = captured
        return
    topo._spied, topo._captured = True, captured
    real_decode, real_padded = topo.decode, topo.padded
    sent: dict[int, tuple[int, torch.Tensor]] = {}  # by the bucket buffer's address
    launched = [0]

    def padded(state, send, width):  # noqa: ANN001, ANN202
        message = real_padded(state, send, width)
        sent[send.buffer.data_ptr()] = (launched[0], message.clone())
        launched[0] += 1
        return message

    def decode(state, shares, gathered, width, out, rows_of=None):  # noqa: ANN001, ANN202
        failed = real_decode(state, shares, gathered, width, out, rows_of)
        order, message = sent.pop(out.data_ptr())
        topo._captured.append((order, message, gathered.clone(), rows_of, width, shares, out.clone()))
        return failed

    topo.padded, topo.decode = padded, decode


def _one_stage(state: dgc.DGCState, topo, captured: list[tuple], world: int) -> tuple[bool, bool]:  # noqa: ANN001
    """Every captured bucket against one all-gather over all processes of the same padded messages:
    the same message in every row, and the same decoded bits."""
    rows_ok = decoded_ok = bool(captured)
    for _, message, gathered, rows_of, width, shares, decoded in captured:
        one = torch.empty(world * width, dtype=torch.uint8)
        dist.all_gather_single(one, message)
        two = gathered.view(-1, width)
        rows_ok &= rows_of is not None and all(
            torch.equal(two[rows_of[r]], one.view(-1, width)[r]) for r in range(world))
        again = torch.zeros_like(decoded)
        failed = type(topo).decode(topo, state, shares, one, width, again)  # rank order, no rows_of
        decoded_ok &= failed is None and torch.equal(again, decoded)
    return rows_ok, decoded_ok


class _Slow(nn.Module):
    """Four 64 x 64 layers; every weight's gradient hook sleeps, so the buckets' hook calls are
    ``delay`` seconds apart (stage A of a bucket has long arrived by the next call)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
        for layer in self.layers:
            layer.weight.register_hook(lambda g: time.sleep(delay))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def early_inside(rank: int, world: int, nodes: list[list[int]], steps: int = 4, delay: float = 0.2) -> dict:
    """hierarchy="node", a bucket per tensor, hook calls ``delay`` apart.  Per step: the stage A
    gathers issued (one per sparse bucket) and, for every stage B, how many stage As had been issued
    when it was (the topology's counters)."""
    torch.manual_seed(0)
    ddp = DDP(_Slow(delay), bucket_cap_mb=0.001)
    opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
    cfg = dgc.DGCConfig(density=0.05, min_compress_numel=16, dense_steps=1, hierarchy="node")
    state = dgc.register(ddp, opt, cfg, node_groups=nodes)
    gen = torch.Generator().manual_seed(100 + rank)
    out: dict = {"across": [], "inside_after": []}
    seen_across, seen_inside = 0, 0
    for _ in range(steps):
        x, y = torch.randn(8, 64, generator=gen), torch.randn(8, 64, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        topo = state.transport._topology
        out["across"].append((seen_across, topo.across_issued))
        out["inside_after"].append(list(topo.inside_issued_after)[seen_inside:])
        seen_across, seen_inside = topo.across_issued, len(topo.inside_issued_after)
    out["params"] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    return out
