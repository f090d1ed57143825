"""The intra-node stage of ``hierarchy="node"`` on CPU tensors: gloo's reduce per share against the
shared-memory stage (:mod:`dgc.node_shm`), side by side, with the triad as the memory yardstick.

    python launch/bench_node_reduce.py                       # 2 and 4 processes, 7 rounds
    python launch/bench_node_reduce.py --procs 2 --rounds 11

Spawns P gloo processes on this host (one node of P processes) and, per case, times the two stages on
the same buffers in interleaved rounds (each round runs every stage once, order rotated, so load from
other processes hits them alike): ``gloo``, :meth:`TorchNodeTopology._reduce_collective` (one
``dist.reduce`` per share, all in flight, then the division: what ``node_reduce="collective"`` runs), and
``shm``, :meth:`NodeShm.reduce` (``node_reduce="shm"``); and the triad ``torch.add(a, b, alpha=0.9,
out=c)`` on preallocated float32 tensors of 25 MB, run by all P processes at once (12 bytes per element).
A stage's time is the slowest process's (a barrier before each), its median over the rounds.

Cases: one 25 MB float32 bucket, and a 102 MB step (ResNet-50's gradients) in DDP's buckets of 25 MB
(4 x 25 MB + 2 MB, one after another as the hook runs them).  Shares: each bucket cut into P equal
contiguous ranges, range j owned by local rank j.

Bytes the shm stage moves per process (float32, bucket of n elements, share s = n/P), as its torch
operations count them: copy the other shares into its slot, 8 (n - s) (read, write); add each of the
P - 1 slots into its share, 12 s each (read both, write); divide, 8 s.  ``shm
GB/s`` is those bytes over the stage's time, ``of triad`` that over the triad's GB/s per process in
the same run.  Before timing, both stages' results are checked against each other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dgc.hierarchy_dist import TorchNodeTopology
from dgc.node_shm import NodeShm

MB = 1 << 20
CASES = {"25 MB bucket": [25], "102 MB step (4x25 + 2 MB)": [25, 25, 25, 25, 2]}


@dataclass(frozen=True)
class Share:
    """A local rank's share of a bucket (the fields :mod:`dgc.hierarchy` and :mod:`dgc.node_shm` read)."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]


@dataclass(frozen=True)
class Row:
    procs: int
    case: str
    gloo_ms: float
    shm_ms: float
    shm_gbs: float
    triad_gbs: float


def equal_shares(numel: int, procs: int) -> list[Share]:
    cuts = [numel * j // procs for j in range(procs + 1)]
    return [Share((f"s{j}",), (cuts[j],), (cuts[j + 1] - cuts[j],)) for j in range(procs)]


def shm_bytes(numel: int, procs: int) -> int:
    """Bytes one process's shm stage moves for a float32 bucket of ``numel`` (see the module doc)."""
    s = numel // procs
    return 8 * (numel - s) + 12 * (procs - 1) * s + 8 * s


def slowest(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes on the slowest process (a barrier first)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


def check(topo: TorchNodeTopology, shm: NodeShm, procs: int, rank: int) -> None:
    """Both stages leave the same average in the owner's share (up to the order of the additions)."""
    gen = torch.Generator().manual_seed(rank)
    numel = 1 << 20
    shares = equal_shares(numel, procs)
    a = torch.randn(numel, generator=gen)
    b = a.clone()
    topo._reduce_collective(shares, a)
    shm.reduce(shares, b)
    own = slice(shares[rank].offsets[0], shares[rank].offsets[0] + shares[rank].numels[0])
    torch.testing.assert_close(a[own], b[own], rtol=1e-5, atol=1e-6)


def measure(topo: TorchNodeTopology, shm: NodeShm, case: str, rounds: int, triad: list[torch.Tensor]) -> Row:
    """One case's medians (every process returns the same figures: the slowest process's times)."""
    procs = topo.local_size
    buckets = [torch.randn(mb * MB // 4) for mb in CASES[case]]
    shares = [equal_shares(t.numel(), procs) for t in buckets]
    a, b, c = triad
    stages = {
        "gloo": lambda: [topo._reduce_collective(s, t) for s, t in zip(shares, buckets, strict=True)],
        "shm": lambda: [shm.reduce(s, t) for s, t in zip(shares, buckets, strict=True)],
        "triad": lambda: torch.add(a, b, alpha=0.9, out=c),
    }
    times: dict[str, list[float]] = {k: [] for k in stages}
    for i in range(rounds + 1):  # round 0 warms up (segment growth, page faults)
        order = list(stages)[i % 3 :] + list(stages)[: i % 3]
        for k in order:
            took = slowest(stages[k])
            if i:
                times[k].append(took)
    med = {k: statistics.median(v) for k, v in times.items()}
    moved = sum(shm_bytes(t.numel(), procs) for t in buckets)
    return Row(procs, case, med["gloo"] * 1e3, med["shm"] * 1e3, moved / med["shm"] / 1e9,
               12 * a.numel() / med["triad"] / 1e9)


def worker(rank: int, procs: int, init: str, rounds: int, queue) -> None:  # noqa: ANN001
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=procs)
    group = dist.new_group(list(range(procs)))
    topo = TorchNodeTopology(nodes=[list(range(procs))], node=0, local_rank=rank, intra=group)
    shm = NodeShm.open(group, 0, rank, procs)
    check(topo, shm, procs, rank)
    n = 25 * MB // 4
    triad = [torch.randn(n), torch.randn(n), torch.empty(n)]
    rows = [measure(topo, shm, case, rounds, triad) for case in CASES]
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def run(procs: int, rounds: int) -> list[Row]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        ps = [ctx.Process(target=worker, args=(r, procs, os.path.join(tmp, "init"), rounds, queue))
              for r in range(procs)]
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        if any(p.exitcode for p in ps):
            raise SystemExit(f"a worker failed (exit codes {[p.exitcode for p in ps]})")
        return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"host: {os.cpu_count()} CPUs, torch {torch.__version__}; medians of {args.rounds} interleaved rounds")
    print(f"{'procs':>5} {'case':<27} {'gloo ms':>9} {'shm ms':>8} {'gloo/shm':>8} {'shm GB/s':>9} "
          f"{'triad GB/s':>10} {'of triad':>8}")
    for procs in args.procs:
        for r in run(procs, args.rounds):
            print(f"{r.procs:>5} {r.case:<27} {r.gloo_ms:>9.1f} {r.shm_ms:>8.1f} {r.gloo_ms / r.shm_ms:>8.2f} "
                  f"{r.shm_gbs:>9.2f} {r.triad_gbs:>10.2f} {r.shm_gbs / r.triad_gbs:>8.2f}")


if __name__ == "__main__":
    main()
