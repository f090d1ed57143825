"""What this machine allows: root, the tools, network namespaces, and the ``tbf``/``netem``
qdiscs (probed in a throw-away namespace)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from .namespaces import CMD_TIMEOUT_S, next_seq

__all__ = ["Capabilities", "capabilities", "check_environment", "netem_available"]


@dataclass(kw_only=True, slots=True)
class Capabilities:
    """Outcome of :func:`capabilities`."""

    problems: list[str]
    """What prevents a simulated cluster, one line per problem with its fix; [] if nothing."""
    netem: bool
    """The kernel has ``sch_netem`` (link delay)."""
    tbf: bool
    """The kernel has ``sch_tbf`` (link rate)."""


def _probe_qdisc(ns: str, args: Sequence[str]) -> bool:
    run = subprocess.run(
        ["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", *args],
        check=False,
        capture_output=True,
        timeout=CMD_TIMEOUT_S,
    )
    if run.returncode == 0:
        subprocess.run(
            ["tc", "-n", ns, "qdisc", "del", "dev", "lo", "root"],
            check=False,
            capture_output=True,
            timeout=CMD_TIMEOUT_S,
        )
    return run.returncode == 0


def _missing_basics(path: str | None) -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append(
            "not root: network namespaces and tc need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); "
            "run with sudo"
        )
    packages = {"ip": "iproute2", "tc": "iproute2", "unshare": "util-linux"}
    missing = [tool for tool in packages if shutil.which(tool, path=path) is None]
    if missing:
        install = sorted({packages[t] for t in missing})
        problems.append(f"missing {', '.join(missing)}: apt-get install {' '.join(install)}")
    return problems


def capabilities(path: str | None = None, prefix: str = "dgcsim") -> Capabilities:
    """Check root and the tools on ``path`` (default ``$PATH``), then create a namespace
    ``<prefix><pid>s<seq>probe`` (``--cleanup-stale`` knows the name) and try both qdiscs in it."""
    problems = _missing_basics(path)
    if problems:
        return Capabilities(problems=problems, netem=False, tbf=False)
    ns = f"{prefix}{os.getpid()}s{next_seq()}probe"
    proc = subprocess.run(
        ["ip", "netns", "add", ns],
        check=False,
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT_S,
    )
    if proc.returncode != 0:
        problems.append(
            f"this machine does not allow network namespaces ('ip netns add' failed: "
            f"{proc.stderr.strip()}); in a container run it privileged (docker --privileged)"
        )
        return Capabilities(problems=problems, netem=False, tbf=False)
    try:
        tbf = _probe_qdisc(ns, ["tbf", "rate", "1gbit", "burst", "64kb", "latency", "10ms"])
        netem = _probe_qdisc(ns, ["netem", "delay", "1ms"])
    finally:
        subprocess.run(
            ["ip", "netns", "del", ns], check=False, capture_output=True, timeout=CMD_TIMEOUT_S
        )
    if not tbf:
        problems.append(
            "the kernel has no tbf qdisc (sch_tbf): 'modprobe sch_tbf', or a kernel with "
            "CONFIG_NET_SCH_TBF; only --bandwidth unlimited works without it"
        )
    return Capabilities(problems=problems, netem=netem, tbf=tbf)


def check_environment(path: str | None = None) -> list[str]:
    """What prevents a simulated cluster here: [] if nothing, else one line per problem + fix.

    Checks root, ``ip``, ``tc`` and ``unshare`` on ``path`` (default ``$PATH``), that a network
    namespace can be created, and that the ``tbf`` qdisc exists. ``netem`` (delay) is reported
    by :func:`netem_available`, since clusters without delay work without it.
    """
    return capabilities(path).problems


def netem_available() -> bool:
    """Whether the kernel has ``sch_netem`` (needed for ``delay_s > 0``); False if not root."""
    return capabilities().netem
