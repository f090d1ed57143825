"""Command line of the bandwidth benchmark (``launch/bench_bandwidth.py``, ``python -m
dgc.bench.bandwidth``): ``worker`` (one node's process, under torchrun), ``sweep`` (the grid on
simulated clusters here, then the report), ``report`` (the report again from a sweep's JSON)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from dgc.bench import grad_shapes

from .methods import METHODS, SWEEP_METHODS
from .options import RunOptions
from .policy_report import policy_report
from .policy_sweep import PolicySweepOptions, policy_sweep
from .report import report
from .results import finite
from .runner import worker
from .sweep import SweepOptions, sweep

__all__ = ["main", "parser"]

log = logging.getLogger("dgc.bench")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet50", choices=sorted(grad_shapes.MODELS))
    p.add_argument("--methods", default=",".join(SWEEP_METHODS),
                   help=f"comma list of {', '.join(METHODS)}, or all (default: "
                        f"{','.join(SWEEP_METHODS)})")
    p.add_argument("--compute", default="real", choices=("real", "synthetic", "sleep"),
                   help="real forward/backward on a small random batch, synthetic gradients, or "
                        "synthetic gradients plus --compute-s of sleep (accelerator time)")
    p.add_argument("--compute-s", type=float, default=0.1,
                   help="seconds of modelled compute per step with --compute sleep (default 0.1)")
    p.add_argument("--interleave", action="store_true",
                   help="attach every method at once and step them in turn (needs the memory of all)")
    p.add_argument("--batch", type=int, default=4, help="samples per rank (real compute)")
    p.add_argument("--image-side", type=int, default=32, help="image side (real compute)")
    p.add_argument("--seq", type=int, default=8, help="sequence length (real compute, lstm)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per method (>= 3)")
    p.add_argument("--steps", type=int, default=5, help="measured steps per method")
    p.add_argument("--local-steps", type=int, default=2,
                   help="steps on a one-rank group, for the codec time (0 = skip)")
    p.add_argument("--replay", type=int, default=2,
                   help="least communication replays, best reported (0 = skip)")
    p.add_argument("--replay-budget-s", type=float, default=1.0,
                   help="fast collectives are replayed again (up to 30 times) within this time")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size")
    p.add_argument("--powersgd-bucket-cap-mb", type=float, default=None,
                   help="PowerSGD bucket size (default: one bucket on gloo, see "
                        "docs/algorithm.md#collectives-from-the-hook-call)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")


def parser() -> argparse.ArgumentParser:
    """The argument parser of the three commands."""
    p = argparse.ArgumentParser(
        prog="bench_bandwidth.py",
        description="Bandwidth benchmark: gradient compressors side by side on the same model, "
                    "network and run (docs/bandwidth.md).")
    sub = p.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("worker", help="one node's process, under torchrun (env:// rendezvous)")
    _common(w)
    w.add_argument("--out", default="", help="JSON file rank 0 writes (default: print it)")
    w.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="auto = nccl with CUDA, else gloo")
    w.add_argument("--iface", default=None,
                   help="interface whose byte counters are read (default $GLOO_SOCKET_IFNAME, "
                        "$NCCL_SOCKET_IFNAME, else lo)")
    w.add_argument("--label", default="", help="free text stored in the results")
    w.add_argument("--timeout", type=float, default=600, help="collective timeout, s")

    s = sub.add_parser("sweep", help="the grid on simulated clusters here (root), then report")
    _common(s)
    s.add_argument("--out", default="results/bandwidth", help="output folder")
    s.add_argument("--nodes", default="2,4", help="node counts (default 2,4)")
    s.add_argument("--bandwidths", default="1gbit,unlimited,10gbit",
                   help="link rates, run in this order (default 1gbit,unlimited,10gbit)")
    s.add_argument("--delay", default="0", help="one-way delay between nodes, e.g. 0.1ms")
    s.add_argument("--extra", default="lstm@2@1gbit",
                   help="extra runs MODEL@NODES@RATE[,...], synthetic compute, no codec run "
                        "('' = none)")
    s.add_argument("--loopback", action="store_true",
                   help="no namespaces: torchrun --standalone on loopback (bandwidth ignored; "
                        "byte counters of lo are shared by all ranks)")
    s.add_argument("--run-timeout", type=float, default=600, help="seconds per cluster run")
    s.add_argument("--budget-s", type=float, default=1140,
                   help="skip the remaining runs once the next one would end past this many "
                        "seconds (estimated from the slowest earlier run of as many nodes); "
                        "0 = no limit (default 1140)")
    s.add_argument("--check", choices=("fail", "warn", "off"), default="warn",
                   help="link rate check before each run (default warn)")

    r = sub.add_parser("report", help="CSV/plots again from the JSON of a sweep")
    r.add_argument("--out", default="results/bandwidth")

    ps = sub.add_parser("policy-sweep", help="policy=auto and hierarchy=node vs dense and flat "
                        "DGC on simulated clusters (root), then policy-report (docs/policy.md)")
    _common(ps)
    ps.set_defaults(compute="sleep", interleave=True, methods="")
    ps.add_argument("--out", default="results/policy", help="output folder")
    ps.add_argument("--nodes", default="2,4", help="node counts; the first gets every comparison")
    ps.add_argument("--procs-per-node", type=int, default=2, help="processes per node (>= 2)")
    ps.add_argument("--slow", default="1gbit", help="the rate-limited link (default 1gbit)")
    ps.add_argument("--mid", default="10gbit",
                    help="further link rates for the first node count, comma list ('' for none; default 10gbit)")
    ps.add_argument("--more-procs", default="4",
                    help="further processes per node, flat vs node at the first node count and --slow "
                         "(comma list, '' for none; default 4)")
    ps.add_argument("--loopback", action="store_true", help="no namespaces (torchrun --standalone)")
    ps.add_argument("--run-timeout", type=float, default=600, help="seconds per cluster run")
    ps.add_argument("--budget-s", type=float, default=1380,
                    help="skip the remaining runs once the next would end past this (default 1380)")
    ps.add_argument("--check", choices=("fail", "warn", "off"), default="warn")

    pr = sub.add_parser("policy-report", help="policy.json, summary and plots again from a policy sweep")
    pr.add_argument("--out", default="results/policy")

    t = sub.add_parser("table", help="the cost model's step time for 8-256 GPUs "
                       "(python -m dgc.bench.bandwidth.scaling --help)")
    t.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        model=args.model,
        methods=_methods(args.methods),
        compute=args.compute,
        compute_s=args.compute_s,
        interleave=args.interleave,
        batch=args.batch,
        image_side=args.image_side,
        seq=args.seq,
        warmup=args.warmup,
        steps=args.steps,
        local_steps=args.local_steps,
        replay=args.replay,
        replay_budget_s=args.replay_budget_s,
        bucket_cap_mb=args.bucket_cap_mb,
        powersgd_bucket_cap_mb=args.powersgd_bucket_cap_mb,
        iface=getattr(args, "iface", None),
        label=getattr(args, "label", ""),
    )


def _methods(text: str) -> tuple[str, ...]:
    """``--methods``: a comma list, ``all``, or empty (the command's own choice: the policy sweep)."""
    if text == "all":
        return tuple(METHODS)
    return _split(text) or SWEEP_METHODS


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in str(text).split(",") if x.strip())


def _worker(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    result = worker(_run_options(args), backend, Path(args.out) if args.out else None,
                    args.timeout)
    if result is not None and not args.out:
        sys.stdout.write(json.dumps(finite(result), indent=1) + "\n")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    try:
        nodes = tuple(int(x) for x in _split(args.nodes))
    except ValueError as e:
        raise ValueError(f"--nodes {args.nodes!r}: give node counts >= 2, e.g. 2,4") from e
    return sweep(SweepOptions(
        out=Path(args.out),
        worker=_run_options(args),
        nodes=nodes,
        bandwidths=_split(args.bandwidths),
        delay=args.delay,
        extra=_split(args.extra),
        loopback=args.loopback,
        run_timeout=args.run_timeout,
        budget_s=args.budget_s,
        check=args.check,
    ))


def _policy_sweep(args: argparse.Namespace) -> int:
    try:
        nodes = tuple(int(x) for x in _split(args.nodes))
    except ValueError as e:
        raise ValueError(f"--nodes {args.nodes!r}: give node counts >= 2, e.g. 2,4") from e
    try:
        more = tuple(int(x) for x in _split(args.more_procs))
    except ValueError as e:
        raise ValueError(f"--more-procs {args.more_procs!r}: give processes-per-node counts, e.g. 4") from e
    return policy_sweep(PolicySweepOptions(
        out=Path(args.out),
        worker=_run_options(args),
        procs_per_node=args.procs_per_node,
        nodes=nodes,
        slow=args.slow,
        mid=tuple(_split(args.mid)),
        more_procs=more,
        budget_s=args.budget_s,
        run_timeout=args.run_timeout,
        check=args.check,
        loopback=args.loopback,
    ))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:  # its own options (python -m dgc.bench.bandwidth.scaling)
        from .scaling import main as table_main

        return table_main(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.cmd == "worker":
        return _worker(args)
    if args.cmd == "sweep":
        return _sweep(args)
    if args.cmd == "policy-sweep":
        return _policy_sweep(args)
    if args.cmd == "policy-report":
        log.info("%s", policy_report(Path(args.out)))
        return 0
    log.info("%s", report(Path(args.out)))
    return 0
