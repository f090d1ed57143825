"""Network namespaces from the host's side: ``ip``/``tc`` calls, listing, killing what runs inside,
deleting, and removing what a killed run left behind (:func:`cleanup_stale`)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import SimClusterError

__all__ = [
    "CMD_TIMEOUT_S",
    "ETC_NETNS",
    "cleanup_stale",
    "delete_namespaces",
    "kill_in_namespaces",
    "list_namespaces",
    "netns_pids",
    "next_seq",
    "pid_alive",
    "sh",
    "stale_namespaces",
]

log = logging.getLogger("dgc.simcluster")

#: Bound of every single ip/tc call; setup and teardown are bounded by these.
CMD_TIMEOUT_S = 20.0
#: Per-namespace /etc files, bind-mounted by ``ip netns exec``.
ETC_NETNS = Path("/etc/netns")
_KILL_GRACE_S = 2.0  # SIGTERM -> SIGKILL
_SEQ = itertools.count()  # makes names unique within one process


def next_seq() -> int:
    """A number unique within this process, for namespace names ``<prefix><pid>s<seq>...``."""
    return next(_SEQ)


def sh(args: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT_S) -> str:
    """Run one ip/tc command; raise SimClusterError with its stderr if it fails."""
    log.debug("$ %s", " ".join(args))
    try:
        proc = subprocess.run(
            list(args),
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise SimClusterError(f"'{' '.join(args)}' did not finish within {timeout} s") from e
    except FileNotFoundError as e:
        raise SimClusterError(f"'{args[0]}' not found: apt-get install iproute2") from e
    if check and proc.returncode != 0:
        raise SimClusterError(
            f"'{' '.join(args)}' failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def list_namespaces(prefix: str = "") -> list[str]:
    """Names of the network namespaces (``ip netns list``) that start with ``prefix``."""
    out = sh(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def netns_pids(ns: str) -> list[int]:
    """Pids of the processes inside namespace ``ns``."""
    out = sh(["ip", "netns", "pids", ns], check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (also one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_in_namespaces(namespaces: Sequence[str], grace_s: float = _KILL_GRACE_S) -> None:
    """SIGTERM every process inside the namespaces, then SIGKILL what is left after grace_s.

    Process groups are not enough: torchrun starts its workers in sessions of their own.
    """
    pids = [p for ns in namespaces for p in netns_pids(ns)]
    if not pids:
        return
    _signal_pids(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        pids = [p for ns in namespaces for p in netns_pids(ns)]
        if not pids:
            return
        time.sleep(0.05)
    _signal_pids(pids, signal.SIGKILL)


def delete_namespaces(namespaces: Sequence[str]) -> list[str]:
    """Kill everything inside, then delete; returns the names that could not be deleted.

    Deleting a namespace destroys its interfaces (veth ends, bridge) and their qdiscs.
    """
    kill_in_namespaces(namespaces)
    failed = []
    for ns in namespaces:
        proc = subprocess.run(
            ["ip", "netns", "del", ns],
            check=False,
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT_S,
        )
        if proc.returncode != 0 and ns in list_namespaces(ns):
            failed.append(ns)
        shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
    with contextlib.suppress(OSError):
        ETC_NETNS.rmdir()  # only if empty: other tools may keep files there
    return failed


def cleanup_stale(prefix: str = "dgcsim") -> list[str]:
    """Delete namespaces named ``<prefix><pid>...`` whose creating process is gone.

    Returns the deleted names. Namespaces of a live simcluster (its pid is running) are kept.
    """
    pat = re.compile(re.escape(prefix) + r"(\d+)s\d+(?:n\d+|br|probe)$")
    names = set(list_namespaces(prefix))
    if ETC_NETNS.is_dir():  # /etc/netns/<ns> files of namespaces already gone
        names |= {p.name for p in ETC_NETNS.iterdir() if p.name.startswith(prefix)}
    stale = []
    for ns in sorted(names):
        m = pat.match(ns)
        if m and not pid_alive(int(m.group(1))):
            stale.append(ns)
    failed = delete_namespaces(stale)
    if failed:
        raise SimClusterError(f"could not delete namespaces {failed}; see 'ip netns pids NAME'")
    return stale


def stale_namespaces(prefix: str) -> list[str]:
    """Namespaces with ``prefix`` whose creating process is dead (what :func:`cleanup_stale`
    would remove), without touching them."""
    return [
        ns
        for ns in list_namespaces(prefix)
        if (m := re.match(re.escape(prefix) + r"(\d+)s", ns)) and not pid_alive(int(m.group(1)))
    ]
