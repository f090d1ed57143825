"""The CPU work of ``hierarchy="node"`` per bucket, besides the codec on the share: the intra-node stage
(gloo's reduce per share, the shared-memory stage before and after folding the division by the node size
into it), and what the share's encoding did to the rest of the bucket before (zero it, check the whole
bucket's finiteness) and does now (a sparse bucket: nothing; the finiteness of the share only), side by
side, with the triad as the memory yardstick.

    python launch/bench_node_reduce.py                       # 2 and 4 processes, 7 rounds
    python launch/bench_node_reduce.py --procs 2 --rounds 11

Spawns P gloo processes on this host (one node of P processes) and, per case, times every stage on the
same buffers in interleaved rounds (each round runs every stage once, order rotated, so load from other
processes hits them alike).  The stages, each on every bucket of the case:

    gloo         :meth:`TorchNodeTopology._reduce_collective` (one ``dist.reduce`` per share, all in
                 flight, then the division: what ``node_reduce="collective"`` runs);
    shm sum+div  :meth:`NodeShm.reduce` with ``fold=False``: copy, add, then a pass dividing by P (before);
    shm folded   :meth:`NodeShm.reduce` as it runs now: scaled copies, the first slot added with the
                 scaling, no division pass (P a power of two; otherwise the same as sum+div);
    zero rest    :meth:`NodeTopology._zero_others`: zeroing the bucket outside the share (before; now a
                 dense bucket only);
    finite all   the finiteness check (:meth:`DGCState.finite`: a float32 sum) of the whole bucket (before);
    finite share the same check of the share's view (now);
    triad        ``torch.add(a, b, alpha=0.9, out=c)`` on preallocated float32 tensors of 25 MB, run by
                 all P processes at once (12 bytes per element).

A stage's time is the slowest process's (a barrier before each), its median over the rounds.  ``before``
= shm sum+div + zero rest + finite all, ``after`` = shm folded + finite share: the node path's CPU time
per step outside the codec, for a sparse bucket.

Cases: one 25 MB float32 bucket, and a 102 MB step (ResNet-50's gradients) in DDP's buckets of 25 MB
(4 x 25 MB + 2 MB, one after another as the hook runs them).  Shares: each bucket cut into P equal
contiguous ranges, range j owned by local rank j.

Bytes per process (float32, bucket of n elements, share s = n/P), as the torch operations count them:
shm sum+div: copy the other shares into its slot, 8 (n - s) (read, write); add each of the P - 1 slots
into its share, 12 s each (read both, write); divide, 8 s.  Folded (P a power of two): the same without
the division.  ``GB/s`` is those bytes over the stage's time, ``of triad`` that over the triad's GB/s
per process in the same run.  Before timing, the stages' results are checked against each other: gloo
and shm close (another order of additions), folded and sum+div bit for bit (P a power of two).
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

from dgc.hierarchy import NodeTopology, pack_share
from dgc.hierarchy_dist import TorchNodeTopology
from dgc.node_shm import NodeShm, folds

MB = 1 << 20
CASES = {"25 MB bucket": [25], "102 MB step (4x25 + 2 MB)": [25, 25, 25, 25, 2]}


@dataclass(frozen=True)
class Share:
    """A local rank's share of a bucket (the fields :mod:`dgc.hierarchy` and :mod:`dgc.node_shm` read)."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]


STAGES = ("gloo", "shm sum+div", "shm folded", "zero rest", "finite all", "finite share", "triad")


@dataclass(frozen=True)
class Row:
    procs: int
    case: str
    ms: dict[str, float]
    """Median milliseconds per stage (:data:`STAGES`)."""
    shm_bytes: dict[str, int]
    """Bytes one process's shm stage moves, per variant ("shm sum+div", "shm folded")."""
    triad_gbs: float


def equal_shares(numel: int, procs: int) -> list[Share]:
    cuts = [numel * j // procs for j in range(procs + 1)]
    return [Share((f"s{j}",), (cuts[j],), (cuts[j + 1] - cuts[j],)) for j in range(procs)]


def shm_bytes(numel: int, procs: int, folded: bool) -> int:
    """Bytes one process's shm stage moves for a float32 bucket of ``numel`` (see the module doc)."""
    s = numel // procs
    return 8 * (numel - s) + 12 * (procs - 1) * s + (0 if folded and folds(torch.float32, procs) else 8 * s)


def finite(t: torch.Tensor) -> bool:
    """:meth:`DGCState.finite` with ``check_finite=True``: the float32 sum is finite."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32)))


def slowest(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes on the slowest process (a barrier first)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


def check(topo: TorchNodeTopology, shm: NodeShm, procs: int, rank: int) -> None:
    """gloo and shm leave the same average in the owner's share (up to the order of the additions);
    folded and sum+div the same bits."""
    gen = torch.Generator().manual_seed(rank)
    numel = 1 << 20
    shares = equal_shares(numel, procs)
    a = torch.randn(numel, generator=gen)
    b, c = a.clone(), a.clone()
    topo._reduce_collective(shares, a)
    shm.fold = True
    shm.reduce(shares, b)
    shm.fold = False
    shm.reduce(shares, c)
    own = slice(shares[rank].offsets[0], shares[rank].offsets[0] + shares[rank].numels[0])
    torch.testing.assert_close(a[own], b[own], rtol=1e-5, atol=1e-6)
    assert torch.equal(b, c), "the folded division changed bits"


def _reduce(shm: NodeShm, fold: bool, shares: list[list[Share]], buckets: list[torch.Tensor]) -> None:
    shm.fold = fold
    for s, t in zip(shares, buckets, strict=True):
        shm.reduce(s, t)


def measure(topo: TorchNodeTopology, shm: NodeShm, case: str, rounds: int, triad: list[torch.Tensor]) -> Row:
    """One case's medians (every process returns the same figures: the slowest process's times)."""
    procs, me = topo.local_size, topo.local_rank
    buckets = [torch.randn(mb * MB // 4) for mb in CASES[case]]
    shares = [equal_shares(t.numel(), procs) for t in buckets]
    scratch = [t.clone() for t in buckets]  # zeroed outside the share: not the buffers the stages reduce
    a, b, c = triad
    stages = {
        "gloo": lambda: [topo._reduce_collective(s, t) for s, t in zip(shares, buckets, strict=True)],
        "shm sum+div": lambda: _reduce(shm, False, shares, buckets),
        "shm folded": lambda: _reduce(shm, True, shares, buckets),
        "zero rest": lambda: [NodeTopology._zero_others(s[me], t) for s, t in zip(shares, scratch, strict=True)],
        "finite all": lambda: [finite(t) for t in buckets],
        "finite share": lambda: [finite(pack_share(s[me], t)) for s, t in zip(shares, buckets, strict=True)],
        "triad": lambda: torch.add(a, b, alpha=0.9, out=c),
    }
    times: dict[str, list[float]] = {k: [] for k in stages}
    for i in range(rounds + 1):  # round 0 warms up (segment growth, page faults)
        order = list(stages)[i % len(stages) :] + list(stages)[: i % len(stages)]
        for k in order:
            took = slowest(stages[k])
            if i:
                times[k].append(took)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    moved = {k: sum(shm_bytes(t.numel(), procs, k == "shm folded") for t in buckets)
             for k in ("shm sum+div", "shm folded")}
    return Row(procs, case, ms, moved, 12 * a.numel() / ms["triad"] * 1e3 / 1e9)


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
    print(f"host: {os.cpu_count()} CPUs, torch {torch.__version__}; medians of {args.rounds} interleaved rounds, "
          "ms per case (slowest process)")
    print(f"{'procs':>5} {'case':<27} " + " ".join(f"{k:>12}" for k in STAGES[:-1])
          + f" {'before':>8} {'after':>8} {'after/before':>12}")
    shm_lines = []
    for procs in args.procs:
        for r in run(procs, args.rounds):
            before = r.ms["shm sum+div"] + r.ms["zero rest"] + r.ms["finite all"]
            after = r.ms["shm folded"] + r.ms["finite share"]
            print(f"{r.procs:>5} {r.case:<27} " + " ".join(f"{r.ms[k]:>12.1f}" for k in STAGES[:-1])
                  + f" {before:>8.1f} {after:>8.1f} {after / before:>12.2f}")
            gbs = {k: r.shm_bytes[k] / r.ms[k] * 1e3 / 1e9 for k in r.shm_bytes}
            shm_lines.append(
                f"{r.procs:>5} {r.case:<27} {r.triad_gbs:>10.2f} {gbs['shm sum+div']:>14.2f} "
                f"{gbs['shm sum+div'] / r.triad_gbs:>8.2f} {gbs['shm folded']:>13.2f} "
                f"{gbs['shm folded'] / r.triad_gbs:>8.2f} {r.ms['shm folded'] / r.ms['shm sum+div']:>13.2f} "
                f"{r.ms['gloo'] / r.ms['shm folded']:>12.2f}")
    print(f"\n{'procs':>5} {'case':<27} {'triad GB/s':>10} {'sum+div GB/s':>14} {'of triad':>8} "
          f"{'folded GB/s':>13} {'of triad':>8} {'folded/s+d':>13} {'gloo/folded':>12}")
    print("\n".join(shm_lines))


if __name__ == "__main__":
    main()
