"""Benchmark: SparseInputLinear vs nn.Linear, forward + backward, side by side in one run.

Every row times the layer as a user gets it (``SparseInputLinear.from_linear(linear,
input_grad=mode)``, default ``min_sparsity=None``: the cost model decides, and the input is
looked at on one forward in ``check_every`` while it runs dense) against ``nn.Linear`` with the
same parameters, the same float32 input (ReLU outputs with the given fraction of features zero
across the batch; x requires grad, as in a hidden layer) and the same output gradient, both
with ``set_to_none`` gradients (a fresh weight gradient per step, as after
``optimizer.zero_grad()``).

Timing: each sample is a block of ``check_every`` consecutive forward+backward steps (so the
zero check a dense-path layer runs once per block is paid in every sample), dense and sparse
blocks alternate, and the speed-up is the median of the per-block ratios dense / sparse (load
from other processes hits both alike). Run once per thread count given.

Targets (issue 6): batch 512, 2048 -> 2048: >= 4x at 90%, >= 1.3x at 50%; never more than 5%
slower (speed-up >= 0.95x) where the layer falls back to dense, including small layers (the
MNIST CNN's 3136 -> 128 and 128 -> 10 at batch 32) and below the break-even.

    python launch/bench_sparse_linear.py --threads 0 1     # torch default (2 here), then 1
    python launch/bench_sparse_linear.py --fit --threads 1 2   # measured vs modelled break-even
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dgc.activation import SparseInputLinear
from dgc.activation.break_even import predicted_break_even, sparse_input
from dgc.activation.sparse_linear import DEFAULT_CHECK_EVERY, active_features, sparse_input_linear

# (batch, in, out, sparsities): the layer at the targets and below the break-even,
# then small layers with dense and sparse inputs.
CASES: list[tuple[int, int, int, tuple[float, ...]]] = [
    (512, 2048, 2048, (0.0, 0.1, 0.15, 0.5, 0.9, 0.95)),
    (128, 1024, 1024, (0.0, 0.5, 0.9)),
    (32, 3136, 128, (0.0, 0.5, 0.9)),
    (32, 128, 10, (0.0, 0.5, 0.9)),
    (64, 512, 512, (0.0, 0.9)),
]


def block_seconds(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor, steps: int) -> float:
    """Seconds per forward+backward step, averaged over ``steps`` consecutive steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        layer.weight.grad = layer.bias.grad = x.grad = None
        layer(x).backward(gy)
    return (time.perf_counter() - t0) / steps


def compare(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, gy: torch.Tensor,
            repeats: int, steps: int) -> tuple[float, float, float]:
    """(dense s/step, sparse s/step, median per-block speed-up), blocks alternating."""
    for _ in range(2):  # warm-up
        block_seconds(dense, x, gy, steps)
        block_seconds(sparse, x, gy, steps)
    pairs = [(block_seconds(dense, x, gy, steps), block_seconds(sparse, x, gy, steps))
             for _ in range(repeats)]
    return (statistics.median(d for d, _ in pairs), statistics.median(s for _, s in pairs),
            statistics.median(d / s for d, s in pairs))


def run_cases(args: argparse.Namespace) -> None:
    threads = torch.get_num_threads()
    print(f"\n## {threads} thread(s): SparseInputLinear (default min_sparsity) vs nn.Linear, "
          f"fwd+bwd, float32, x requires grad; median of {args.repeats} blocks of "
          f"{args.steps} steps\n")
    print("| batch x in -> out | feature sparsity | mode | threshold | path | nn.Linear ms "
          "| Sparse ms | speed-up |")
    print("|---|---:|---|---:|:---:|---:|---:|---:|")
    worst_dense = (float("inf"), "")
    for n, f_in, f_out, sparsities in CASES:
        if args.shapes and f"{n}x{f_in}x{f_out}" not in args.shapes:
            continue
        torch.manual_seed(0)
        dense = nn.Linear(f_in, f_out)
        gy = torch.randn(n, f_out)
        for s in sparsities:
            x = sparse_input(n, f_in, s).requires_grad_()
            for mode in args.modes:
                # Big layers: fewer steps per block (one step is already long), and the layer
                # looks at its input once per block all the same (check_every = steps).
                steps = args.steps if n * f_in * f_out < 2**28 else max(1, args.steps // 4)
                sparse = SparseInputLinear.from_linear(dense, input_grad=mode,
                                                       check_every=steps)
                th = predicted_break_even(batch=n, in_features=f_in, out_features=f_out,
                                          input_grad=mode, threads=threads)
                d, sp, ratio = compare(dense, sparse, x, gy, args.repeats, steps)
                path = "sparse" if sparse.last_sparse else "dense"
                print(f"| {n} x {f_in} -> {f_out} | {s:.0%} | {mode} | "
                      f"{'never' if th >= 1 else f'{th:.2f}'} | {path} | {d * 1e3:.3f} | "
                      f"{sp * 1e3:.3f} | {ratio:.2f}x |", flush=True)
                if path == "dense" and ratio < worst_dense[0]:
                    worst_dense = (ratio, f"{n}x{f_in}->{f_out} at {s:.0%} ({mode})")
    print(f"\nworst speed-up where the layer ran dense: {worst_dense[0]:.3f}x "
          f"({worst_dense[1]}); target >= 0.95x")


def forced_speedup(n: int, f_in: int, f_out: int, mode: str, s: float) -> float:
    """Median dense / sparse time per step with the sparse path forced (no threshold)."""
    w = torch.randn(f_out, f_in, requires_grad=True)
    b = torch.zeros(f_out, requires_grad=True)
    x = sparse_input(n, f_in, s).requires_grad_()
    gy = torch.randn(n, f_out)

    def step(sparse: bool) -> float:
        t0 = time.perf_counter()
        w.grad = b.grad = x.grad = None
        if sparse:
            idx = active_features(x)
            y = sparse_input_linear(x, w, b, idx, input_grad=mode)  # type: ignore[arg-type]
        else:
            y = F.linear(x, w, b)
        y.backward(gy)
        return time.perf_counter() - t0

    step(True)
    reps = max(5, min(101, int(0.3 / max(step(False), 1e-6))))
    return statistics.median(step(False) / step(True) for _ in range(reps))


def fit_table(args: argparse.Namespace) -> None:
    """Forced sparse path vs dense at s = 0, 0.5, 0.9 over a grid of shapes: the measured
    break-even (linear interpolation of sparse/dense time) next to the model's."""
    threads = torch.get_num_threads()
    print(f"\n## {threads} thread(s): measured break-even (sparse path forced) vs model\n")
    print("| batch | in | out | mode | x at 0% | x at 50% | x at 90% | measured s* | model |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for n in (16, 64, 256, 512):
        for f_in in (128, 512, 2048):
            for f_out in (10, 128, 512, 2048):
                for mode in args.modes:
                    r = [forced_speedup(n, f_in, f_out, mode, s) for s in (0.0, 0.5, 0.9)]
                    q = [1 / v for v in r]  # sparse time / dense time
                    if q[0] <= 1:
                        s_star = 0.0
                    elif q[1] <= 1:
                        s_star = 0.5 * (q[0] - 1) / (q[0] - q[1])
                    elif q[2] <= 1:
                        s_star = 0.5 + 0.4 * (q[1] - 1) / (q[1] - q[2])
                    else:
                        s_star = 1.0
                    th = predicted_break_even(batch=n, in_features=f_in, out_features=f_out,
                                              input_grad=mode, threads=threads)
                    print(f"| {n} | {f_in} | {f_out} | {mode} | {r[0]:.2f} | {r[1]:.2f} | "
                          f"{r[2]:.2f} | {'never' if s_star >= 1 else f'{s_star:.2f}'} | "
                          f"{'never' if th >= 1 else f'{th:.2f}'} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[0],
                    help="torch thread counts to run, one after the other (0 = torch default)")
    ap.add_argument("--repeats", type=int, default=9, help="blocks per side and row")
    ap.add_argument("--steps", type=int, default=DEFAULT_CHECK_EVERY,
                    help="steps per block (= the layer's check_every)")
    ap.add_argument("--modes", nargs="+", default=["active", "full"], choices=["active", "full"])
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="only these of the default cases, as BATCHxINxOUT (e.g. 512x2048x2048)")
    ap.add_argument("--fit", action="store_true",
                    help="instead: measured vs modelled break-even over a grid of 48 shapes")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    for t in args.threads:
        torch.set_num_threads(t or default_threads)
        if args.fit:
            fit_table(args)
        else:
            run_cases(args)


if __name__ == "__main__":
    main()
