"""The policy sweep (issue 13's goals): ``policy="auto"`` and ``hierarchy="node"`` against dense and
flat sparse DGC on the simulated cluster, then :func:`~.policy_report.policy_report`.

``launch/bench_bandwidth.py policy-sweep --out results/policy``.  Every run uses several processes
per node (``--procs-per-node``, default 2: torchrun's ``--nproc_per_node``, so ``LOCAL_WORLD_SIZE``
tells ``hierarchy="node"`` where the nodes are; the worker checks it against the host names),
``--compute sleep`` (accelerator time modelled as sleep, the CPU free for the codec) and interleaved
methods (step ``s`` of every method before step ``s + 1`` of any).  The runs, in this order:

==================================  ===========================================================
``<model>-n2xP-unlimited``           dense, dense-hook (the same allreduce from a Python hook),
                                     dgc-dense (DGC's dense path, what ``auto`` runs when it goes
                                     dense), dgc, dgc-auto
``<model>-n2xP-unlimited-density-0.25``  dense, dense-hook, dgc@0.25, dgc-auto@0.25
``<model>-n2xP-1gbit``               dense, dgc, dgc-auto, dgc-node
``<model>-n2xP-10gbit``              dense, dgc, dgc-auto, dgc-node (each ``--mid`` rate)
``<model>-nNxP-1gbit``               dgc, dgc-node, for each further node count (bytes vs nodes)
``<model>-n2xQ-1gbit``               dgc, dgc-node, for each ``--more-procs`` count Q (bytes and
                                     step time vs processes per node)
==================================  ===========================================================

The two unlimited runs also make the one-rank codec runs that the predictions use.

``--budget-s`` skips the remaining runs once the next one would end past it (estimated from the
slowest earlier run, scaled by its number of processes).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from dgc.bench import simcluster

from .methods import WARMUP_DENSITY
from .options import RunOptions
from .policy_report import policy_report
from .report import RUNS_DIR
from .sweep import RunSpec, SweepOptions, run_one

__all__ = ["PolicySweepOptions", "plan", "policy_sweep"]

log = logging.getLogger("dgc.bench")

UNLIMITED_METHODS = ("dense", "dense-hook", "dgc-dense", "dgc", "dgc-auto")
QUARTER_METHODS = ("dense", "dense-hook", f"dgc@{WARMUP_DENSITY:g}", f"dgc-auto@{WARMUP_DENSITY:g}")
"""Density 0.25 in a cluster run of its own: its 29 MB messages take more memory than the 2-core
VM has left with the other methods attached at once."""
QUARTER_TAG = f"density-{WARMUP_DENSITY:g}"
SLOW_METHODS = ("dense", "dgc", "dgc-auto", "dgc-node")
NODE_METHODS = ("dgc", "dgc-node")


@dataclass(kw_only=True, slots=True)
class PolicySweepOptions:
    """The ``policy-sweep`` command's flags."""

    out: Path = Path("results/policy")
    worker: RunOptions = field(default_factory=lambda: RunOptions(compute="sleep", interleave=True))
    """What every run measures (methods come from :func:`plan`)."""
    procs_per_node: int = 2
    nodes: tuple[int, ...] = (2, 4)
    """Node counts; the first gets the full comparison, the others flat vs node at ``slow``."""
    slow: str = "1gbit"
    """The rate-limited link."""
    mid: tuple[str, ...] = ("10gbit",)
    """Further link rates compared at the first node count, with the methods of ``slow``."""
    more_procs: tuple[int, ...] = ()
    """Further processes-per-node counts (the command line's default: 4): flat vs ``hierarchy="node"`` at the first node count and
    ``slow`` (flat's inter-node bytes grow with the processes of a node, the hierarchy's do not)."""
    budget_s: float = 1380.0
    """Skip the remaining runs once the next one would end past this many seconds (0 = no limit)."""
    run_timeout: float = 600.0
    check: str = "warn"
    loopback: bool = False


def plan(opts: PolicySweepOptions) -> list[RunSpec]:
    """The runs of the sweep, in order (see the module)."""
    if not opts.nodes or any(n < 2 for n in opts.nodes):
        raise ValueError(f"--nodes {opts.nodes!r}: give node counts >= 2, e.g. 2,4")
    if opts.procs_per_node < 2:
        raise ValueError(f"--procs-per-node {opts.procs_per_node}: hierarchy='node' needs >= 2 "
                         "processes per node to differ from flat DGC")
    if any(q < 2 or q == opts.procs_per_node for q in opts.more_procs):
        raise ValueError(f"--more-procs {opts.more_procs!r}: give processes-per-node counts >= 2 other "
                         f"than --procs-per-node {opts.procs_per_node} (or '' for none)")
    w, p, first = opts.worker, opts.procs_per_node, opts.nodes[0]
    common = {"model": w.model, "compute": w.compute, "procs_per_node": p}
    runs = [
        RunSpec(nodes=first, rate="unlimited", local_steps=w.local_steps, methods=UNLIMITED_METHODS,
                **common),
        RunSpec(nodes=first, rate="unlimited", local_steps=w.local_steps, methods=QUARTER_METHODS,
                tag=QUARTER_TAG, **common),
        RunSpec(nodes=first, rate=opts.slow, local_steps=0, methods=SLOW_METHODS, **common),
    ]
    runs += [RunSpec(nodes=first, rate=r, local_steps=0, methods=SLOW_METHODS, **common) for r in opts.mid]
    runs += [RunSpec(nodes=n, rate=opts.slow, local_steps=0, methods=NODE_METHODS, **common)
             for n in opts.nodes[1:]]
    runs += [RunSpec(nodes=first, rate=opts.slow, local_steps=0, methods=NODE_METHODS,
                     **{**common, "procs_per_node": q}) for q in opts.more_procs]
    return runs


def policy_sweep(opts: PolicySweepOptions) -> int:
    """Run :func:`plan` on simulated clusters (or loopback), then the report; 1 if a run failed."""
    runs_dir = opts.out / RUNS_DIR
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = plan(opts)
    if not opts.loopback and (problems := simcluster.check_environment()):
        log.error("policy-sweep: no simulated cluster here:\n  %s\n  (use --loopback)", "\n  ".join(problems))
        return 2
    sweep_opts = SweepOptions(out=opts.out, worker=dataclasses.replace(opts.worker), loopback=opts.loopback,
                              run_timeout=opts.run_timeout, check=opts.check, budget_s=0)
    t0 = time.monotonic()
    failures, skipped, per_process = 0, [], 0.0
    for run in runs:
        elapsed = time.monotonic() - t0
        guess = per_process * run.processes
        if opts.budget_s and elapsed + guess > opts.budget_s:
            log.info("=== %s skipped: %.0f s spent, estimated %.0f s, --budget-s %.0f",
                     run.name, elapsed, guess, opts.budget_s)
            skipped.append(run.name)
            continue
        log.info("=== %s (%.0f s into the policy sweep)", run.name, elapsed)
        wall = run_one(run, sweep_opts, runs_dir / f"{run.name}.json")
        if wall is None:
            failures += 1
            continue
        per_process = max(per_process, wall / run.processes)
    total = time.monotonic() - t0
    log.info("=== policy sweep done in %.0f s (%d failed, %d skipped runs)", total, failures, len(skipped))
    log.info("%s", policy_report(opts.out, sweep_seconds=total, skipped=skipped))
    return 1 if failures else 0
