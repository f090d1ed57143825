#!/usr/bin/env python3
"""Accuracy parity: does DGC keep the dense model's accuracy at a fraction of the bytes?

Trains, with the same seeds, epochs and hyperparameters, dense DDP and every compression option
on the MNIST CNN and the character LSTM (``experiment=parity_mnist`` / ``parity_lstm``), each run
a ``torchrun --standalone --nproc_per_node=N launch/train.py`` of its own, one after the other.
Writes to ``--out``:

* ``parity.md``: the table (accuracy or perplexity, difference to dense, bytes sent per worker
  and step, compression ratio, achieved density, wall time) and the commands;
* ``<task>_loss.png`` and ``<task>_bytes.png``: training loss and bytes sent vs step;
* ``<task>/<method>/``: every run's Hydra folder (metrics.jsonl, train.log).

    python launch/parity.py                 # 4 ranks, ~15-20 min on 2 cores
    python launch/parity.py --tasks mnist --methods dense,dgc
    python launch/parity.py --report-only   # rebuild table and plots

Targets (issue 3, after the paper's figures: docs/algorithm.md#anchors): DGC within 0.5 points of dense accuracy on MNIST and within 3% of
dense perplexity on the LSTM, at >= 250x fewer gradient bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dgc.bench")

__all__ = ["METHODS", "ROOT", "SPARSE_METHODS", "TASKS", "TRAIN", "Task", "command", "main", "plots", "records",
           "run", "table"]

#: The checkout the studies run in (its launch/train.py and conf/); an editable install's.
ROOT = Path(__file__).resolve().parents[2]
#: The training entry point every run of a study starts.
TRAIN = ROOT / "launch" / "train.py"


@dataclass(frozen=True, slots=True)
class Task:
    name: str
    experiment: str
    metric: str  # "accuracy" (higher is better) or "perplexity" (lower is better)
    overrides: tuple[str, ...] = ()  # per-task settings of the compressors (same for all methods)


TASKS = {
    "mnist": Task("mnist", "parity_mnist", "accuracy", ("compress.warmup_epochs=1",)),
    "lstm": Task("lstm", "parity_lstm", "perplexity", ("compress.warmup_epochs=0.25",)),
}
METHODS = {  # method -> train.py overrides
    "dense": (),
    "dgc": ("+compress=dgc",),
    "topk": ("+compress=topk",),
    "powersgd": ("+compress=powersgd",),
    "fp16": ("+compress=fp16",),
    # issue 15: the quantized compressors (two-phase all-to-all + all-gather, error feedback, the
    # options' defaults) and DGC with int8 values
    "int8": ("+compress=int8",),
    "terngrad": ("+compress=terngrad",),
    "qsgd": ("+compress=qsgd",),
    "dgc-int8": ("+compress=dgc", "compress.config.value_dtype=int8"),
}
#: Methods that are DGC underneath: they get the task's density warm-up (``Task.overrides``).
SPARSE_METHODS = ("dgc", "topk", "dgc-int8")


def command(task: Task, method: str, ranks: int, run_dir: Path, extra: list[str]) -> list[str]:
    overrides = [f"experiment={task.experiment}", *METHODS[method]]
    if method in SPARSE_METHODS:
        overrides += list(task.overrides)
    overrides += [f"hydra.run.dir={run_dir}", *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", str(TRAIN), *overrides]


def run(cmd: list[str], log: Path, timeout: float) -> float:
    """Run one training command (1 thread per rank) with its output to ``log``; wall seconds.

    Raises RuntimeError with the log's tail if it fails."""
    if not TRAIN.is_file():
        raise FileNotFoundError(f"{TRAIN} is missing: the studies run in a checkout of the "
                                "repository (pip install -e .), not from an installed wheel")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                              cwd=ROOT, check=False)
    if proc.returncode:
        tail = log.read_text().splitlines()[-20:]
        raise RuntimeError(f"run failed ({proc.returncode}): {shlex.join(cmd)}\n" + "\n".join(tail))
    return time.perf_counter() - t0


def records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (empty if it has none)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _fmt_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def table(out: Path, tasks: list[Task], methods: list[str], ranks: int,
          walls: dict[tuple[str, str], float]) -> str:
    lines = [
        f"| task | method | test {'/'.join(sorted({t.metric for t in tasks}))} | vs dense | "
        "bytes sent / step (last epoch) | compression (last epoch) | compression (whole run) | "
        "achieved density (last epoch) | wall time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task in tasks:
        base = None
        for method in methods:
            recs = records(out / task.name / method)
            summary = next((r for r in recs if r["event"] == "summary"), None)
            epochs = [r for r in recs if r["event"] == "epoch"]
            if summary is None or not epochs:
                lines.append(f"| {task.name} | {method} | (missing) | | | | | | |")
                continue
            last = epochs[-1]
            value = summary[f"test_{task.metric}"]
            if method == "dense":
                base = value
            if base is None:
                delta = ""
            elif task.metric == "accuracy":
                delta = f"{value - base:+.2f} pt"
            else:
                delta = f"{100 * (value / base - 1):+.2f}%"
            shown = f"{value:.2f}%" if task.metric == "accuracy" else f"{value:.3f}"
            wall = walls.get((task.name, method))
            lines.append(
                f"| {task.name} | {method} | {shown} | {delta} | "
                f"{_fmt_bytes(last['bytes_sent_per_step'])} | {last['compression_ratio']:.0f}x | "
                f"{summary['compression_ratio']:.0f}x | {100 * last['achieved_density']:.3g}% | "
                f"{'' if wall is None else f'{wall:.0f} s'} |"
            )
    return "\n".join(lines)


def plots(out: Path, task: Task, methods: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for key, ylabel, log in (("loss", "training loss", False),
                             ("bytes_sent_per_step", "bytes sent per worker and step", True)):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for method in methods:
            steps = [r for r in records(out / task.name / method) if r["event"] == "step"]
            if steps:
                ax.plot([r["step"] for r in steps], [r[key] for r in steps], label=method)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{task.name}: {ylabel}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{task.name}_{'loss' if key == 'loss' else 'bytes'}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/parity"), help="output folder")
    p.add_argument("--ranks", type=int, default=4, help="processes per run (gloo on CPU)")
    p.add_argument("--tasks", default="mnist,lstm", help=f"comma list of {sorted(TASKS)}")
    p.add_argument("--methods", default="dense,dgc,topk,powersgd",
                   help=f"comma list of {sorted(METHODS)}; dense first for the deltas")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--report-only", action="store_true", help="only rebuild table and plots")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    tasks = [TASKS[t] for t in args.tasks.split(",")]
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {sorted(METHODS)}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    walls_path = out / "walls.json"
    walls: dict[tuple[str, str], float] = {}
    if walls_path.exists():
        walls = {tuple(k.split("/")): v for k, v in json.loads(walls_path.read_text()).items()}
    commands = []
    t_all = time.perf_counter()
    for task in tasks:
        for method in methods:
            run_dir = out / task.name / method
            cmd = command(task, method, args.ranks, run_dir, args.overrides)
            commands.append(shlex.join(["torchrun", *cmd[3:]]).replace(str(out), "$OUT"))
            if args.report_only:
                continue
            log.info(f"[parity] {task.name}/{method}: {shlex.join(cmd[3:])}")
            walls[(task.name, method)] = run(cmd, run_dir / "console.log", args.timeout)
            walls_path.write_text(json.dumps({"/".join(k): v for k, v in walls.items()}))
            summary = next(r for r in records(run_dir) if r["event"] == "summary")
            log.info(f"[parity]   test {task.metric} {summary[f'test_{task.metric}']:.3f}, "
                     f"{summary['compression_ratio']:.0f}x over the run, "
                     f"{walls[(task.name, method)]:.0f} s")
    md = table(out, tasks, methods, args.ranks, walls)
    pngs = [p for task in tasks for p in plots(out, task, methods)]
    total = sum(walls.values())
    text = "\n".join([
        f"# Accuracy parity ({args.ranks} ranks, gloo)", "", md, "",
        f"Total wall time of the runs: {total / 60:.1f} min"
        + ("" if args.report_only else f" (this invocation {(time.perf_counter() - t_all) / 60:.1f} min)"),
        "", "Commands:", "", "```", *commands, "```", "",
        "Plots: " + ", ".join(p.name for p in pngs), "",
    ])
    (out / "parity.md").write_text(text)
    log.info("%s", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
