"""Command line of the simulated cluster (``launch/simcluster.py``, ``python -m
dgc.bench.simcluster``): set up N nodes, check the link, run a command on every node, clean up."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .capabilities import check_environment
from .cluster import SimCluster
from .config import PLACEHOLDERS, SimClusterConfig
from .errors import Interrupted, SimClusterError
from .namespaces import cleanup_stale
from .rates import parse_rate, parse_time
from .signals import handle_signals

__all__ = ["main", "parser"]

log = logging.getLogger("dgc.simcluster")


def parser() -> argparse.ArgumentParser:
    """The argument parser (``--help`` lists every option)."""
    p = argparse.ArgumentParser(
        prog="simcluster.py",
        description=(
            "Run the same multi-node command on N simulated nodes (network namespaces) joined "
            "by rate-limited, delayed links. Placeholders in the command: "
            + ", ".join("{" + k + "}" for k in PLACEHOLDERS)
            + ". Without a command: set up, check the link, print the measured rate, tear down."
        ),
        epilog=(
            "example: sudo python launch/simcluster.py --nodes 2 --bandwidth 1gbit -- "
            "torchrun --nnodes {nnodes} --node_rank {node_rank} --nproc_per_node 1 "
            "--master_addr {master_addr} --master_port {master_port} script.py"
        ),
    )
    p.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    p.add_argument(
        "--bandwidth",
        default="1gbit",
        help="rate of each node's link, both directions: '1gbit', '100mbit', "
        "'unlimited' (default 1gbit)",
    )
    p.add_argument(
        "--delay",
        default="0",
        help="one-way delay between two nodes, e.g. '0.2ms' (default 0); needs netem",
    )
    p.add_argument(
        "--allow-no-delay",
        action="store_true",
        help="if the kernel lacks netem, warn and run without delay instead of failing",
    )
    p.add_argument(
        "--check",
        choices=("fail", "warn", "off"),
        default="fail",
        help="link rate check before the command: fail (default), warn, off",
    )
    p.add_argument(
        "--check-seconds",
        type=float,
        default=1.0,
        help="duration of the link check stream (default 1.0)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds before the command is stopped on every node (default 600); exit code 124",
    )
    p.add_argument(
        "--fail-grace",
        type=float,
        default=5.0,
        help="seconds the other nodes may keep running after one failed (default 5)",
    )
    p.add_argument(
        "--master-port", type=int, default=29500, help="value of {master_port} (default 29500)"
    )
    p.add_argument("--prefix", default="dgcsim", help="namespace name prefix (default dgcsim)")
    p.add_argument(
        "--cleanup-stale",
        action="store_true",
        help="delete namespaces with the prefix left by dead runs, then exit "
        "(or go on if a command follows)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every setup step")
    p.add_argument(
        "command", nargs=argparse.REMAINDER, help="after '--': the command to run on every node"
    )
    return p


def _config(args: argparse.Namespace) -> SimClusterConfig:
    """The cluster the arguments ask for (ValueError/TypeError naming the bad option)."""
    if not args.timeout > 0:
        raise ValueError(f"--timeout {args.timeout} must be > 0 seconds")
    return SimClusterConfig(
        nodes=args.nodes,
        bandwidth_bit_s=parse_rate(args.bandwidth),
        delay_s=parse_time(args.delay),
        allow_no_delay=args.allow_no_delay,
        master_port=args.master_port,
        prefix=args.prefix,
    )


def _check_link(cluster: SimCluster, mode: str, seconds: float) -> None:
    if mode == "off":
        return
    try:
        cluster.check_link(duration_s=seconds)  # logs the measured rate
    except SimClusterError as e:
        if mode == "fail":
            raise
        log.warning("link check: %s", e)


def _run(config: SimClusterConfig, command: list[str], args: argparse.Namespace) -> int:
    """Build the cluster, check its link, run ``command`` on every node; the exit code."""
    with SimCluster(config) as cluster:
        _check_link(cluster, args.check, args.check_seconds)
        if not command:
            return 0
        log.info("running on %d nodes: %s", config.nodes, " ".join(command))
        result = cluster.run(command, timeout_s=args.timeout, fail_grace_s=args.fail_grace)
        for node in result.nodes:
            log.info(
                "node%d exit %d%s",
                node.rank,
                node.returncode,
                " (stopped by simcluster)" if node.killed else "",
            )
        if result.timed_out:
            log.error("timed out after %.0f s; stopped every node", args.timeout)
        return result.exit_code


def _cleanup(prefix: str) -> None:
    removed = cleanup_stale(prefix)
    log.info(
        "removed %d stale namespaces%s",
        len(removed),
        f": {' '.join(removed)}" if removed else "",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0, the failing node's code, 124 on timeout,
    2 for bad arguments or a missing requirement, 3 if the cluster failed, 128+signal)."""
    args = parser().parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[simcluster] %(message)s",
        stream=sys.stderr,
    )
    try:
        config = _config(args)
    except (ValueError, TypeError) as e:
        log.error("%s", e)
        return 2
    try:
        with handle_signals():
            problems = check_environment()
            if problems:
                log.error("cannot simulate a cluster here:\n%s",
                          "\n".join(f"  {problem}" for problem in problems))
                return 2
            if args.cleanup_stale:
                _cleanup(args.prefix)
                if not command:
                    return 0
            return _run(config, command, args)
    except SimClusterError as e:
        log.error("%s", e)
        return 3
    except Interrupted as e:
        log.error("interrupted by %s; cleaned up", e)
        return 128 + e.signum
