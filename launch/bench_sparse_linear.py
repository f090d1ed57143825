"""Benchmark: SparseInputLinear vs nn.Linear, forward + backward, side by side in one run.

Input: ReLU-like activations (batch 512 x 2048 features by default) of which a fraction of the
features is zero across the whole batch; layer 2048 -> 2048; x requires grad (a hidden
layer). Each time is the median of ``--repeats`` runs, dense and sparse interleaved so that
load from other processes on a shared machine hits both alike; the speed-up is the median
of the per-repeat ratios dense / sparse.

Targets (issue 6): >= 4x at 90%, >= 1.3x at 50%, never more than 5% slower below the
break-even (where the layer falls back to dense).

    python launch/bench_sparse_linear.py                    # CPU, both input-gradient modes
    python launch/bench_sparse_linear.py --threads 1 --repeats 15
    python launch/bench_sparse_linear.py --break-even        # also sweep for the break-even
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from dgc.activation import SparseInputLinear, measure_break_even
from dgc.activation.break_even import sparse_input
from dgc.activation.sparse_linear import active_features


def fwd_bwd(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> float:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    t0 = time.perf_counter()
    layer(x).backward(gy)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--features", type=int, default=2048, help="in = out features")
    ap.add_argument("--sparsities", type=float, nargs="+",
                    default=[0.0, 0.25, 0.5, 0.75, 0.9, 0.95])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--modes", nargs="+", default=["active", "full"], choices=["active", "full"])
    ap.add_argument("--break-even", action="store_true", help="sweep for the break-even point")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, f = args.batch, args.features
    dense = nn.Linear(f, f).to(args.device)
    layers = {}
    for mode in args.modes:
        layer = SparseInputLinear.from_linear(dense, input_grad=mode)
        layers[mode] = layer
    gy = torch.randn(n, f, device=args.device)
    print(f"# SparseInputLinear vs nn.Linear, fwd+bwd, batch {n}, {f}x{f}, float32, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats}")
    header = "| feature sparsity | nn.Linear ms |"
    for mode in args.modes:
        header += f" sparse[{mode}] ms | speed-up[{mode}] | path[{mode}] |"
    print(header)
    print("|---:|---:|" + "---:|---:|:---:|" * len(args.modes))
    for s in args.sparsities:
        x = sparse_input(n, f, s, device=args.device).requires_grad_()
        times: dict[str, list[float]] = {"dense": [], **{m: [] for m in args.modes}}
        for _ in range(2):  # warm-up
            fwd_bwd(dense, x, gy)
            for layer in layers.values():
                fwd_bwd(layer, x, gy)
        for _ in range(args.repeats):
            times["dense"].append(fwd_bwd(dense, x, gy))
            for mode, layer in layers.items():
                times[mode].append(fwd_bwd(layer, x, gy))
        d = statistics.median(times["dense"])
        row = f"| {s:.0%} | {d * 1e3:.1f} |"
        for mode, layer in layers.items():
            t = statistics.median(times[mode])
            # Median of the per-repeat ratios: robust to load changing between repeats.
            ratio = statistics.median(a / b for a, b in zip(times["dense"], times[mode],
                                                            strict=True))
            path = "sparse" if layer.last_sparse else "dense"
            row += f" {t * 1e3:.1f} | {ratio:.2f}x | {path} |"
        print(row, flush=True)
    # Below the break-even the layer runs F.linear plus its zero check: time the check alone
    # against the dense step (less noisy than the ratio of two nearly equal timings).
    x = sparse_input(n, f, 0.0, device=args.device)
    check, full_step = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        active_features(x)
        check.append(time.perf_counter() - t0)
        full_step.append(fwd_bwd(dense, x.requires_grad_(), gy))
    c, d = statistics.median(check), statistics.median(full_step)
    print(f"\nzero check (dense-path overhead below the break-even): {c * 1e3:.2f} ms = "
          f"{100 * c / d:.2f}% of nn.Linear fwd+bwd ({d * 1e3:.1f} ms)")
    if args.break_even:
        for mode in args.modes:
            r = measure_break_even(batch=n, in_features=f, out_features=f, input_grad=mode,
                                   device=args.device, repeats=args.repeats,
                                   sparsities=(0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5))
            pts = ", ".join(f"{s:.0%}: {x:.2f}x" for s, x in
                            zip(r.sparsities, r.speedup, strict=True))
            print(f"break-even[{mode}] = {r.break_even:.0%}  (sparse path forced: {pts})")


if __name__ == "__main__":
    main()
