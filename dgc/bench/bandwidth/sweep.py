"""The sweep: the worker on a simulated cluster (:mod:`dgc.bench.simcluster`) for each node count
and link rate, one JSON per run, then :func:`~.report.report`. Needs root (network namespaces);
``loopback=True`` runs ``torchrun --standalone`` instead."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgc.bench import simcluster
from dgc.bench.simcluster.signals import handle_signals

from .options import RunOptions
from .report import RUNS_DIR, report

__all__ = ["RunSpec", "SweepOptions", "grid", "record", "run_one", "run_simcluster", "sweep",
           "worker_argv"]

log = logging.getLogger("dgc.bench")

#: How every node starts the worker (after torchrun's own options).
WORKER_MODULE = ["-m", "dgc.bench.bandwidth", "worker"]


@dataclass(kw_only=True, slots=True, frozen=True)
class RunSpec:
    """One cluster run of the sweep."""

    model: str
    nodes: int
    rate: str
    """Link rate as simcluster reads it: "1gbit", "10gbit", "unlimited"."""
    compute: str
    local_steps: int
    """0 = no codec run (the report then takes codec_s from another run of the same model and N)."""
    procs_per_node: int = 1
    """Processes per node (``torchrun --nproc_per_node``; it sets ``LOCAL_WORLD_SIZE``, where
    ``hierarchy="node"`` finds the nodes)."""
    methods: tuple[str, ...] | None = None
    """The methods of this run; None = the sweep's (``RunOptions.methods``)."""
    tag: str = ""
    """Appended to the run's name (two runs of the same cluster, e.g. two densities)."""

    @property
    def name(self) -> str:
        procs = f"x{self.procs_per_node}" if self.procs_per_node > 1 else ""
        tag = f"-{self.tag}" if self.tag else ""
        return f"{self.model}-n{self.nodes}{procs}-{self.rate}{tag}"

    @property
    def processes(self) -> int:
        return self.nodes * self.procs_per_node


@dataclass(kw_only=True, slots=True)
class SweepOptions:
    """The ``sweep`` command's flags."""

    out: Path = Path("results/bandwidth")
    """Output folder (``per_run/`` and the report)."""
    worker: RunOptions = field(default_factory=RunOptions)
    """What every run measures (its model and compute are the grid's)."""
    nodes: tuple[int, ...] = (2, 4)
    """Node counts, each >= 2."""
    bandwidths: tuple[str, ...] = ("1gbit", "unlimited", "10gbit")
    """Link rates, run in this order (a sweep cut short keeps the first ones)."""
    delay: str = "0"
    """One-way delay between nodes, e.g. "0.1ms"."""
    extra: tuple[str, ...] = ("lstm@2@1gbit",)
    """Extra runs ``MODEL@NODES@RATE``: synthetic compute, no codec run."""
    loopback: bool = False
    """No namespaces: ``torchrun --standalone`` on loopback (bandwidth ignored)."""
    run_timeout: float = 600.0
    """Seconds per cluster run."""
    budget_s: float = 1140.0
    """Skip the remaining runs once the next one would end past this many seconds (estimated
    from the slowest earlier run of as many nodes); 0 = no limit."""
    check: str = "warn"
    """Link rate check before each run: fail, warn, off."""


def grid(opts: SweepOptions) -> list[RunSpec]:
    """The runs, rate by rate: a sweep cut short by ``budget_s`` keeps the first rates for every
    node count. The codec time does not depend on the link: measured at the first rate only."""
    if not opts.nodes or any(n < 2 for n in opts.nodes):
        raise ValueError(f"--nodes {opts.nodes!r}: give node counts >= 2, e.g. 2,4")
    if not opts.bandwidths:
        raise ValueError("--bandwidths is empty: give rates like 1gbit,10gbit,unlimited")
    w = opts.worker
    runs = [RunSpec(model=w.model, nodes=n, rate=rate, compute=w.compute,
                    local_steps=w.local_steps if i == 0 else 0)
            for i, rate in enumerate(opts.bandwidths) for n in opts.nodes]
    for item in opts.extra:
        try:
            model, n, rate = item.strip().split("@")
            runs.append(RunSpec(model=model, nodes=int(n), rate=rate, compute="synthetic",
                                local_steps=0))
        except ValueError as e:
            raise ValueError(f"--extra {item!r} must look like MODEL@NODES@RATE, e.g. "
                             "lstm@2@1gbit") from e
    return runs


def worker_argv(w: RunOptions, run: RunSpec, out: Path, threads: int) -> list[str]:
    """The worker's arguments for one run (after ``-m dgc.bench.bandwidth``)."""
    return [
        *WORKER_MODULE[2:],
        "--model", run.model,
        "--methods", ",".join(run.methods or w.methods),
        "--compute", run.compute,
        "--compute-s", str(w.compute_s),
        *(["--interleave"] if w.interleave else []),
        "--batch", str(w.batch),
        "--image-side", str(w.image_side),
        "--seq", str(w.seq),
        "--warmup", str(w.warmup),
        "--steps", str(w.steps),
        "--local-steps", str(run.local_steps),
        "--replay", str(w.replay),
        "--replay-budget-s", str(w.replay_budget_s),
        "--bucket-cap-mb", str(w.bucket_cap_mb),
        *(["--powersgd-bucket-cap-mb", str(w.powersgd_bucket_cap_mb)]
          if w.powersgd_bucket_cap_mb is not None else []),
        "--threads", str(threads),
        "--label", run.rate,
        "--out", str(out),
    ]


def _torchrun(nodes_args: list[str], args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *nodes_args, *WORKER_MODULE[:2],
            *args]


def _run_loopback(run: RunSpec, args: list[str], env_extra: dict[str, str], timeout: float) -> bool:
    cmd = _torchrun(["--standalone", "--nproc_per_node", str(run.processes)], args)
    try:
        proc = subprocess.run(cmd, env={**os.environ, **env_extra}, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        log.error("%s: timed out after %s s", run.name, timeout)
        return False
    return proc.returncode == 0


_NOISE = re.compile(
    r"hostname of the client socket cannot be retrieved|FutureWarning|return func\(\*args"
    r"|ddp = DDP\(|^\s*$"
)


def _node_line(rank: int, line: str) -> None:
    """A node's output line, without the warnings every run repeats."""
    if not _NOISE.search(line):
        log.info("[node%d] %s", rank, line.rstrip())


def _measure(cluster: simcluster.SimCluster, check: str, name: str) -> dict[str, float]:
    if check == "off":
        return {}
    try:
        m = cluster.check_link()
    except simcluster.SimClusterError as e:
        if check == "fail":
            raise
        log.warning("%s: link check: %s", name, e)
        m = cluster.measure_link(0, 1)
    return {} if m is None else {"measured_bit_s": m.throughput_bit_s, "rtt_s": m.rtt_s}


def run_simcluster(run: RunSpec, args: list[str], env_extra: dict[str, str],
                   opts: SweepOptions) -> tuple[bool, dict[str, Any]]:
    """The worker (``args``) under torchrun on every node of a fresh simulated cluster for ``run``
    (always torn down); ``(every node exited 0, the link as asked and measured)``."""
    cfg = simcluster.SimClusterConfig(
        nodes=run.nodes,
        bandwidth_bit_s=simcluster.parse_rate(run.rate),
        delay_s=simcluster.parse_time(opts.delay),
    )
    link: dict[str, Any] = {"simulated": True, "asked_bit_s": cfg.bandwidth_bit_s,
                            "delay_s": cfg.delay_s}
    cmd = _torchrun(["--nnodes", "{nnodes}", "--node_rank", "{node_rank}",
                     "--nproc_per_node", str(run.procs_per_node),
                     "--master_addr", "{master_addr}", "--master_port", "{master_port}"], args)
    try:  # SIGTERM/SIGINT/SIGHUP unwind through the cluster's teardown (namespaces deleted)
        with handle_signals(), simcluster.SimCluster(cfg) as cluster:
            link.update(_measure(cluster, opts.check, run.name))
            result = cluster.run(cmd, timeout_s=opts.run_timeout, on_line=_node_line,
                                 extra_env=env_extra)
            return result.ok, link
    except simcluster.SimClusterError as e:
        log.error("%s: %s", run.name, e)
        return False, link


def record(path: Path, run: RunSpec, link: dict[str, Any], wall_s: float) -> None:
    """Add what only the sweep knows to the run's JSON: the link and the wall time."""
    data = json.loads(path.read_text())
    data["meta"].update(link=link, rate=run.rate, wall_s=wall_s, run_name=run.name, tag=run.tag,
                        host=platform.node())  # the nodes have host names node<i> of their own
    path.write_text(json.dumps(data, indent=1))


def run_one(run: RunSpec, opts: SweepOptions, path: Path) -> float | None:
    """One cluster run (simulated, or loopback) writing ``path``; its wall seconds, None if it failed."""
    threads = max(1, (os.cpu_count() or 1) // run.processes)
    env = {"OMP_NUM_THREADS": str(threads)}
    args = worker_argv(opts.worker, run, path, threads)
    path.unlink(missing_ok=True)
    started = time.monotonic()
    if opts.loopback:
        ok, link = _run_loopback(run, args, env, opts.run_timeout), {
            "simulated": False, "asked_bit_s": None}
    else:
        ok, link = run_simcluster(run, args, env, opts)
    if not ok or not path.exists():
        log.error("=== %s FAILED", run.name)
        return None
    wall = time.monotonic() - started
    record(path, run, link, wall)
    return wall


def sweep(opts: SweepOptions) -> int:
    """Run the grid (simulated clusters, or loopback), then :func:`report`; 1 if a run failed."""
    runs_dir = opts.out / RUNS_DIR
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = grid(opts)
    if not opts.loopback and (problems := simcluster.check_environment()):
        log.error("bench_bandwidth sweep: no simulated cluster here:\n  %s\n  (use --loopback to "
                  "run without network namespaces)", "\n  ".join(problems))
        return 2
    t0 = time.monotonic()
    failures, skipped, walls = 0, [], {}
    for run in runs:
        path = runs_dir / f"{run.name}.json"
        elapsed, slowest = time.monotonic() - t0, walls.get(run.nodes, 0.0)
        if opts.budget_s and elapsed + slowest > opts.budget_s:
            log.info("=== %s skipped: %.0f s spent, a run of %d nodes took %.0f s, --budget-s "
                     "%.0f", run.name, elapsed, run.nodes, slowest, opts.budget_s)
            skipped.append(run.name)
            continue
        log.info("=== %s (%.0f s into the sweep)", run.name, elapsed)
        wall = run_one(run, opts, path)
        if wall is None:
            failures += 1
            continue
        walls[run.nodes] = max(slowest, wall)
    total = time.monotonic() - t0
    log.info("=== sweep done in %.0f s (%d failed, %d skipped runs)", total, failures, len(skipped))
    log.info("%s", report(opts.out, sweep_seconds=total, skipped=skipped))
    return 1 if failures else 0
