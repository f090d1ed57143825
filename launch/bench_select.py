"""Selection benchmark: dgc.topk_select vs x.clone() vs torch.topk, side by side in one run.

    python launch/bench_select.py [--numel 25000000] [--density 0.001] [--repeats 7]

Prints median times and the ratios the core issue targets (topk_select <= 2x x.clone()).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import dgc


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=25_000_000)
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.numel)
    k = math.ceil(args.density * args.numel)
    rows = {
        "x.clone()": _median_time(lambda: x.clone(), args.repeats),
        "torch.topk(|x|, k)": _median_time(lambda: torch.topk(x.abs(), k, sorted=False), max(3, args.repeats // 2)),
        "topk_select (sampled 1%)": _median_time(lambda: dgc.topk_select(x, k, 0.01), args.repeats),
        "topk_select (exact, ratio 1)": _median_time(lambda: dgc.topk_select(x, k, 1.0), args.repeats),
    }
    idx, _ = dgc.topk_select(x, k, 0.01)
    exact = set(torch.topk(x.abs(), k).indices.tolist()) == set(idx.tolist())
    base = rows["x.clone()"]
    print(f"numel={args.numel:,} density={args.density} k={k:,} threads={torch.get_num_threads()}")
    print(f"{'method':32s} {'ms':>9s} {'x clone':>9s}")
    for name, t in rows.items():
        print(f"{name:32s} {t * 1e3:9.2f} {t / base:9.2f}")
    print(f"topk_select / torch.topk: {rows['topk_select (sampled 1%)'] / rows['torch.topk(|x|, k)']:.3f}")
    print(f"same index set as torch.topk: {exact}")


if __name__ == "__main__":
    main()
