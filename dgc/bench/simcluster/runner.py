"""Running one command on every node at once: output per node, fail-fast, timeout, cleanup."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .namespaces import CMD_TIMEOUT_S, kill_in_namespaces
from .results import ClusterResult, NodeResult

__all__ = ["NodeLaunch", "print_line", "run_on_nodes", "stop_processes"]

_print_lock = threading.Lock()


def print_line(rank: int, line: str) -> None:
    """The default output handler: ``[node<rank>] line`` on stdout."""
    with _print_lock:
        sys.stdout.write(f"[node{rank}] {line}")
        if not line.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()


def _pump(
    proc: subprocess.Popen[bytes], rank: int, sink: list[str], emit: Callable[[int, str], None]
) -> None:
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        line = raw.decode(errors="replace")
        sink.append(line)
        emit(rank, line)
    proc.stdout.close()


@dataclass(kw_only=True, slots=True)
class NodeLaunch:
    """How to start the command on one node."""

    argv: list[str]
    """Full command line (entering the node's namespace)."""
    env: dict[str, str]
    namespace: str
    """The node's namespace: whatever runs in it when the command ends is stopped."""


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], namespaces: Sequence[str]) -> None:
    """SIGTERM the processes' sessions, kill what runs in ``namespaces``, SIGKILL, reap."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
    kill_in_namespaces(namespaces)
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=CMD_TIMEOUT_S)


def _wait(
    procs: list[subprocess.Popen[bytes]],
    namespaces: list[str],
    timeout_s: float,
    fail_grace_s: float,
    start: float,
) -> tuple[list[bool], bool]:
    """Wait for every process; returns (stopped by us, per node) and whether it timed out."""
    killed = [False] * len(procs)
    kill_at = start + timeout_s
    while None in (codes := [p.poll() for p in procs]):  # poll all: no short cut
        now = time.monotonic()
        if any(c not in (None, 0) for c in codes):
            kill_at = min(kill_at, now + fail_grace_s)
        if now >= kill_at:
            killed = [p.poll() is None for p in procs]
            stop_processes(procs, namespaces)
            return killed, now >= start + timeout_s
        time.sleep(0.05)
    return killed, False


def run_on_nodes(
    launches: Sequence[NodeLaunch],
    *,
    timeout_s: float,
    fail_grace_s: float,
    on_line: Callable[[int, str], None],
    track: list[subprocess.Popen[bytes]],
) -> ClusterResult:
    """Start every node's command, stream its output to ``on_line(rank, line)``, and wait.

    When a node fails, the others get ``fail_grace_s`` seconds to finish before they are stopped
    (a torchrun peer would otherwise wait for its rendezvous timeout); after ``timeout_s`` all
    are stopped and ``timed_out`` is set. The processes are in ``track`` while they run.
    """
    namespaces = [launch.namespace for launch in launches]
    lines: list[list[str]] = [[] for _ in launches]
    procs: list[subprocess.Popen[bytes]] = []
    readers = []
    start = time.monotonic()
    for rank, launch in enumerate(launches):
        proc = subprocess.Popen(
            launch.argv,
            env=launch.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the nodes ourselves
        )
        procs.append(proc)
        track.append(proc)
        t = threading.Thread(target=_pump, args=(proc, rank, lines[rank], on_line), daemon=True)
        t.start()
        readers.append(t)
    try:
        killed, timed_out = _wait(procs, namespaces, timeout_s, fail_grace_s, start)
    except BaseException:
        stop_processes(procs, namespaces)
        raise
    finally:
        # What the command left running (daemons, orphaned workers) goes with it.
        kill_in_namespaces(namespaces)
        for t in readers:
            t.join(timeout=5)
        for p in procs:
            track.remove(p)
    return ClusterResult(
        nodes=[
            NodeResult(rank=r, returncode=p.returncode, output="".join(lines[r]), killed=killed[r])
            for r, p in enumerate(procs)
        ],
        timed_out=timed_out,
        seconds=time.monotonic() - start,
    )
