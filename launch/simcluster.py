#!/usr/bin/env python3
"""A simulated multi-node cluster on one machine: network namespaces joined by rate-limited links.

Each "node" is a Linux network namespace with one interface ``eth0`` (address 198.18.0.<rank+1>/24,
inside 198.18.0.0/15, the range RFC 2544 reserves for benchmarking) plugged into a bridge that
lives in a namespace of its own, so nothing is added to the host's network. Every link is shaped
in both directions with ``tc``:

* rate: a token-bucket filter (``tbf``) on the node-side egress (what the node sends) and on the
  bridge-side egress (what the node receives), so a node sends *and* receives at most the asked
  rate, like a host behind a switch port;
* delay: ``netem`` with half the asked delay on each of those two egresses, so the one-way delay
  between any two nodes is ``--delay`` and the round trip ``2 * --delay``.

The same command runs in every node (``ip netns exec``), with placeholders filled per node, as a
real cluster's launcher would run it on each machine::

    sudo python launch/simcluster.py --nodes 2 --bandwidth 1gbit --delay 0.2ms -- \\
        torchrun --nnodes {nnodes} --node_rank {node_rank} --nproc_per_node 1 \\
        --master_addr {master_addr} --master_port {master_port} script.py

Before the command runs, a short TCP stream from node 0 to node 1 checks that the link delivers
the asked rate (and not more: that would mean the limiter is not in effect), and a ping-pong
measures the round-trip time. Everything created (namespaces, hence their links, bridge and
qdiscs, and every process inside them) is removed on success, failure, timeout, Ctrl-C and
SIGTERM; ``--cleanup-stale`` removes what a killed run (SIGKILL) left behind.

Importable API: :class:`SimClusterConfig`, :class:`SimCluster` (a context manager with
:meth:`SimCluster.measure_link`, :meth:`SimCluster.check_link`, :meth:`SimCluster.run`),
:func:`check_environment`, :func:`cleanup_stale`. See docs/simcluster.md.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ClusterResult",
    "Interrupted",
    "LinkMeasurement",
    "NodeResult",
    "SimCluster",
    "SimClusterConfig",
    "SimClusterError",
    "check_environment",
    "cleanup_stale",
    "list_namespaces",
    "main",
    "netem_available",
    "parse_rate",
    "parse_time",
    "substitute_placeholders",
]

log = logging.getLogger("dgc.simcluster")

#: First three octets of every node address; node ``i`` is ``198.18.0.<i+1>``.
SUBNET_PREFIX = "198.18.0."
#: Most nodes a cluster can have (addresses .1 to .250 of one /24).
MAX_NODES = 250
#: Name of each node's interface inside its namespace (also exported as GLOO_SOCKET_IFNAME etc.).
NODE_IFNAME = "eth0"
#: Placeholders that :func:`substitute_placeholders` fills; any other ``{...}`` is left as it is.
PLACEHOLDERS = ("node_rank", "nnodes", "master_addr", "master_port", "node_addr")

_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")
_CMD_TIMEOUT_S = 20.0  # every single ip/tc call; setup and teardown are bounded by these
_KILL_GRACE_S = 2.0  # SIGTERM -> SIGKILL
_PROBE_PORT = 5201
_SEQ = itertools.count()  # makes names unique within one process
_ETC_NETNS = Path("/etc/netns")  # per-namespace /etc files, bind-mounted by `ip netns exec`


class SimClusterError(RuntimeError):
    """The cluster cannot be set up, checked or torn down; the message says why and how to fix."""


# ---------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------

_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_rate(text: str) -> float | None:
    """Parse a link rate like ``"1gbit"``, ``"100mbit"`` or ``"2.5gbit"`` into bits per second.

    ``"unlimited"`` (also ``"none"``, ``"inf"``) returns ``None``: no rate limit. Units are
    decimal (1 gbit = 1e9 bit/s), as in ``tc``; ``tc``'s byte units (``bps``, ``mbps``) are
    refused because they are easy to misread as bits.
    """
    s = text.strip().lower()
    if s in ("unlimited", "none", "inf"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)", s)
    if m is None or m.group(2) not in _RATE_UNITS:
        raise ValueError(
            f"bandwidth {text!r} is not a rate: use a number with one of "
            f"{', '.join(_RATE_UNITS)} (e.g. '1gbit', '100mbit') or 'unlimited'"
        )
    bits = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if not bits > 0 or not math.isfinite(bits):
        raise ValueError(f"bandwidth {text!r} must be > 0; use 'unlimited' for no limit")
    return bits


def parse_time(text: str) -> float:
    """Parse a duration like ``"0.2ms"``, ``"50us"`` or ``"1s"`` into seconds (``"0"`` is 0)."""
    s = text.strip().lower()
    if s in ("0", "0.0", "off", "none"):
        return 0.0
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)", s)
    if m is None or m.group(2) not in _TIME_UNITS:
        raise ValueError(
            f"delay {text!r} is not a duration: use a number with one of "
            f"{', '.join(_TIME_UNITS)} (e.g. '0.2ms', '50us') or '0'"
        )
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def format_rate(bits_per_s: float | None) -> str:
    """``1.5e9 -> '1.50 Gbit/s'``; ``None -> 'unlimited'``."""
    if bits_per_s is None:
        return "unlimited"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:.2f} {unit}"
    return f"{bits_per_s:.0f} bit/s"


def substitute_placeholders(argv: Sequence[str], values: dict[str, object]) -> list[str]:
    """Replace ``{name}`` for each name in ``values`` inside every argument of ``argv``.

    Only the given names are touched: other braces (JSON, shell ``${VAR}``, Python f-strings in a
    ``-c`` script) pass through unchanged, which ``str.format`` would not allow.
    """
    pattern = re.compile(r"\{(" + "|".join(re.escape(k) for k in values) + r")\}")
    return [pattern.sub(lambda m: str(values[m.group(1)]), arg) for arg in argv]


# ---------------------------------------------------------------------------------------------
# Configuration and results
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class SimClusterConfig:
    """What cluster to build. Every field is checked in ``__post_init__``."""

    nodes: int = 2
    """Number of nodes (network namespaces), 1 to 250. Node 0 hosts the rendezvous."""
    bandwidth_bit_s: float | None = 1e9
    """Rate of every node's link in bit/s, applied to what a node sends and to what it
    receives. ``None`` = unlimited (no ``tbf``; the veth pair then runs as fast as the CPU)."""
    delay_s: float = 0.0
    """One-way delay in seconds between any two nodes (round trip = 2x); 0 = off (no
    ``netem``). Needs the kernel's ``sch_netem``."""
    allow_no_delay: bool = False
    """If ``delay_s > 0`` and the kernel has no ``netem``: False = refuse to start,
    True = warn and run without delay."""
    queue_s: float = 0.010
    """Queue of each rate limiter, in seconds at the link rate (``tbf latency``); packets beyond
    it are dropped, like a switch buffer."""
    master_port: int = 29500
    """Port filled into ``{master_port}`` (and ``MASTER_PORT``); the rendezvous runs on node 0."""
    prefix: str = "dgcsim"
    """Start of every namespace name: ``<prefix><pid>s<seq>n<rank>`` and ``...br`` for the
    bridge. ``--cleanup-stale`` removes names with this prefix whose pid is dead."""

    def __post_init__(self) -> None:
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int):
            raise TypeError(f"nodes must be an int, got {type(self.nodes).__name__}")
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"nodes={self.nodes} must be between 1 and {MAX_NODES}")
        if self.bandwidth_bit_s is not None and not (
            self.bandwidth_bit_s >= 1e3 and math.isfinite(self.bandwidth_bit_s)
        ):
            raise ValueError(
                f"bandwidth_bit_s={self.bandwidth_bit_s} must be >= 1000 bit/s and finite; "
                "use None for an unlimited link"
            )
        if not (self.delay_s >= 0 and math.isfinite(self.delay_s)):
            raise ValueError(f"delay_s={self.delay_s} must be >= 0 seconds (0 = no delay)")
        if not self.queue_s > 0:
            raise ValueError(f"queue_s={self.queue_s} must be > 0 seconds")
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port={self.master_port} must be a TCP port (1-65535)")
        if not _NAME_RE.match(self.prefix):
            raise ValueError(
                f"prefix={self.prefix!r} must be 1-16 lowercase letters/digits starting with a "
                "letter (it starts namespace names)"
            )

    @property
    def master_addr(self) -> str:
        """Address of node 0, where the rendezvous runs."""
        return node_addr(0)


def node_addr(rank: int) -> str:
    """IPv4 address of node ``rank`` (198.18.0.<rank+1>)."""
    return f"{SUBNET_PREFIX}{rank + 1}"


@dataclass(kw_only=True, slots=True)
class LinkMeasurement:
    """What a probe from one node to another measured."""

    src: int
    dst: int
    throughput_bit_s: float
    """Payload bytes received per second by ``dst`` (TCP goodput, so a few % under the rate)."""
    rtt_s: float
    """Median round-trip time of a 1-byte TCP ping-pong (includes Python overhead, ~50 us)."""
    seconds: float
    """How long the stream ran."""


@dataclass(kw_only=True, slots=True)
class NodeResult:
    """Outcome of the command on one node."""

    rank: int
    returncode: int
    """Exit status; negative = killed by that signal (as in ``subprocess``)."""
    output: str
    """stdout and stderr, interleaved as the node wrote them."""
    killed: bool = False
    """True if simcluster stopped it (timeout, another node failed, interrupt)."""


@dataclass(kw_only=True, slots=True)
class ClusterResult:
    """Outcome of :meth:`SimCluster.run`."""

    nodes: list[NodeResult] = field(default_factory=list)
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(n.returncode == 0 for n in self.nodes)

    @property
    def exit_code(self) -> int:
        """Shell-style code: 0, 124 on timeout, else the first failing node's (128+sig)."""
        if self.timed_out:
            return 124
        for n in sorted(self.nodes, key=lambda n: (n.killed, n.rank)):
            if n.returncode != 0:
                return n.returncode if n.returncode > 0 else 128 - n.returncode
        return 0


# ---------------------------------------------------------------------------------------------
# System helpers
# ---------------------------------------------------------------------------------------------


def _sh(args: Sequence[str], *, check: bool = True, timeout: float = _CMD_TIMEOUT_S) -> str:
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
    out = _sh(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def _netns_pids(ns: str) -> list[int]:
    out = _sh(["ip", "netns", "pids", ns], check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


def _pid_alive(pid: int) -> bool:
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


def _kill_in_namespaces(namespaces: Sequence[str], grace_s: float = _KILL_GRACE_S) -> None:
    """SIGTERM every process inside the namespaces, then SIGKILL what is left after grace_s.

    Process groups are not enough: torchrun starts its workers in sessions of their own.
    """
    pids = [p for ns in namespaces for p in _netns_pids(ns)]
    if not pids:
        return
    _signal_pids(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        pids = [p for ns in namespaces for p in _netns_pids(ns)]
        if not pids:
            return
        time.sleep(0.05)
    _signal_pids(pids, signal.SIGKILL)


def _delete_namespaces(namespaces: Sequence[str]) -> list[str]:
    """Kill everything inside, then delete; returns the names that could not be deleted.

    Deleting a namespace destroys its interfaces (veth ends, bridge) and their qdiscs.
    """
    _kill_in_namespaces(namespaces)
    failed = []
    for ns in namespaces:
        proc = subprocess.run(
            ["ip", "netns", "del", ns],
            check=False,
            capture_output=True,
            text=True,
            timeout=_CMD_TIMEOUT_S,
        )
        if proc.returncode != 0 and ns in list_namespaces(ns):
            failed.append(ns)
        shutil.rmtree(_ETC_NETNS / ns, ignore_errors=True)
    with contextlib.suppress(OSError):
        _ETC_NETNS.rmdir()  # only if empty: other tools may keep files there
    return failed


def cleanup_stale(prefix: str = "dgcsim") -> list[str]:
    """Delete namespaces named ``<prefix><pid>...`` whose creating process is gone.

    Returns the deleted names. Namespaces of a live simcluster (its pid is running) are kept.
    """
    pat = re.compile(re.escape(prefix) + r"(\d+)s\d+(?:n\d+|br|probe)$")
    names = set(list_namespaces(prefix))
    if _ETC_NETNS.is_dir():  # /etc/netns/<ns> files of namespaces already gone
        names |= {p.name for p in _ETC_NETNS.iterdir() if p.name.startswith(prefix)}
    stale = []
    for ns in sorted(names):
        m = pat.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            stale.append(ns)
    failed = _delete_namespaces(stale)
    if failed:
        raise SimClusterError(f"could not delete namespaces {failed}; see 'ip netns pids NAME'")
    return stale


def _probe_qdisc(ns: str, args: Sequence[str]) -> bool:
    ok = (
        subprocess.run(
            ["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", *args],
            check=False,
            capture_output=True,
            timeout=_CMD_TIMEOUT_S,
        ).returncode
        == 0
    )
    if ok:
        subprocess.run(
            ["tc", "-n", ns, "qdisc", "del", "dev", "lo", "root"],
            check=False,
            capture_output=True,
            timeout=_CMD_TIMEOUT_S,
        )
    return ok


@dataclass(kw_only=True, slots=True)
class _Capabilities:
    problems: list[str]
    netem: bool
    tbf: bool


def _capabilities(path: str | None = None, prefix: str = "dgcsim") -> _Capabilities:
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
    if problems:
        return _Capabilities(problems=problems, netem=False, tbf=False)
    ns = f"{prefix}{os.getpid()}s{next(_SEQ)}probe"  # --cleanup-stale knows this name too
    proc = subprocess.run(
        ["ip", "netns", "add", ns],
        check=False,
        capture_output=True,
        text=True,
        timeout=_CMD_TIMEOUT_S,
    )
    if proc.returncode != 0:
        problems.append(
            f"this machine does not allow network namespaces ('ip netns add' failed: "
            f"{proc.stderr.strip()}); in a container run it privileged (docker --privileged)"
        )
        return _Capabilities(problems=problems, netem=False, tbf=False)
    try:
        tbf = _probe_qdisc(ns, ["tbf", "rate", "1gbit", "burst", "64kb", "latency", "10ms"])
        netem = _probe_qdisc(ns, ["netem", "delay", "1ms"])
    finally:
        subprocess.run(
            ["ip", "netns", "del", ns], check=False, capture_output=True, timeout=_CMD_TIMEOUT_S
        )
    if not tbf:
        problems.append(
            "the kernel has no tbf qdisc (sch_tbf): 'modprobe sch_tbf', or a kernel with "
            "CONFIG_NET_SCH_TBF; only --bandwidth unlimited works without it"
        )
    return _Capabilities(problems=problems, netem=netem, tbf=tbf)


def check_environment(path: str | None = None) -> list[str]:
    """What prevents a simulated cluster here: [] if nothing, else one line per problem + fix.

    Checks root, ``ip``, ``tc`` and ``unshare`` on ``path`` (default ``$PATH``), that a network
    namespace can be created, and that the ``tbf`` qdisc exists. ``netem`` (delay) is reported
    by :func:`netem_available`, since clusters without delay work without it.
    """
    return _capabilities(path).problems


def netem_available() -> bool:
    """Whether the kernel has ``sch_netem`` (needed for ``delay_s > 0``); False if not root."""
    return _capabilities().netem


# ---------------------------------------------------------------------------------------------
# The link probe: run inside the namespaces with the same Python as this process
# ---------------------------------------------------------------------------------------------

_PROBE_SOURCE = r"""
import json, socket, statistics, sys, time
role, host, port, duration = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if role == "server":
    srv = socket.create_server((host, port))
    srv.settimeout(duration + 20)
    conn, _ = srv.accept()                      # phase 1: echo 1-byte pings
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (b := conn.recv(1)):
        conn.sendall(b)
    conn.close()
    conn, _ = srv.accept()                      # phase 2: count a stream
    conn.settimeout(duration + 20)
    buf = bytearray(1 << 20)
    first = conn.recv_into(buf)
    t0 = time.perf_counter()
    n = 0
    while (r := conn.recv_into(buf)):
        n += r
    t1 = time.perf_counter()
    print(json.dumps({"bytes": n, "seconds": t1 - t0}))
else:
    def connect():
        end = time.monotonic() + 10
        while True:
            try:
                return socket.create_connection((host, port), timeout=duration + 20)
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.02)
    conn = connect()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(50):
        t = time.perf_counter()
        conn.sendall(b"x")
        conn.recv(1)
        rtts.append(time.perf_counter() - t)
    conn.close()
    conn = connect()
    data = b"\0" * (1 << 20)
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        conn.sendall(data)
    conn.close()
    print(json.dumps({"rtt_s": statistics.median(rtts)}))
"""


# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------


class SimCluster:
    """N network namespaces joined by a bridge, with shaped links; a context manager.

    ``with SimCluster(cfg) as c:`` builds everything (:meth:`setup`) and always tears it down
    (:meth:`teardown`), also on exceptions; an ``atexit`` hook is a second line of defence for
    code that does not use ``with``.
    """

    def __init__(self, config: SimClusterConfig) -> None:
        self.config = config
        self.name = f"{config.prefix}{os.getpid()}s{next(_SEQ)}"
        self.delay_applied_s = 0.0
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._up = False

    # -- names ----------------------------------------------------------------------------------
    def node_ns(self, rank: int) -> str:
        """Namespace name of node ``rank``."""
        return f"{self.name}n{rank}"

    @property
    def bridge_ns(self) -> str:
        return f"{self.name}br"

    @property
    def namespaces(self) -> list[str]:
        return [self.bridge_ns] + [self.node_ns(i) for i in range(self.config.nodes)]

    def placeholders(self, rank: int) -> dict[str, object]:
        """Values of ``{node_rank}``, ``{nnodes}``, ``{master_addr}``, ``{master_port}``,
        ``{node_addr}`` for node ``rank``."""
        cfg = self.config
        return {
            "node_rank": rank,
            "nnodes": cfg.nodes,
            "master_addr": cfg.master_addr,
            "master_port": cfg.master_port,
            "node_addr": node_addr(rank),
        }

    def node_env(self, rank: int, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of the command on node ``rank``.

        Adds ``DGCSIM_NODE_RANK``/``NNODES``/``MASTER_ADDR``/``MASTER_PORT``/``NODE_ADDR``,
        ``MASTER_ADDR``/``MASTER_PORT`` (for ``init_method='env://'``), and points gloo, NCCL
        and TensorPipe at ``eth0`` (``GLOO_SOCKET_IFNAME`` etc.), the node's only link: a
        value inherited from the host would name an interface that is not there.
        """
        env = dict(os.environ if base is None else base)
        for key, value in self.placeholders(rank).items():
            env[f"DGCSIM_{key.upper()}"] = str(value)
        env["MASTER_ADDR"] = self.config.master_addr
        env["MASTER_PORT"] = str(self.config.master_port)
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME"):
            env[var] = NODE_IFNAME
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def exec_argv(self, rank: int, argv: Sequence[str]) -> list[str]:
        """Command line that runs ``argv`` (placeholders filled) on node ``rank``.

        ``ip netns exec`` enters the node's network namespace; ``unshare --uts`` gives the
        command a host name of its own, ``node<rank>``: all nodes share the machine's host
        name otherwise, and torchrun's c10d rendezvous hands that name to the workers as
        MASTER_ADDR, which would then point every node at itself.
        """
        set_hostname = 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"'
        return [
            "ip",
            "netns",
            "exec",
            self.node_ns(rank),
            "unshare",
            "--uts",
            "--",
            "sh",
            "-c",
            set_hostname,
            f"node{rank}",
            *substitute_placeholders(argv, self.placeholders(rank)),
        ]

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> SimCluster:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        """Check the machine, then create namespaces, bridge, veth pairs, addresses and qdiscs."""
        cfg = self.config
        caps = _capabilities(prefix=cfg.prefix)
        if caps.problems:
            raise SimClusterError(
                "cannot simulate a cluster here:\n  " + "\n  ".join(caps.problems)
            )
        self.delay_applied_s = cfg.delay_s
        if cfg.delay_s > 0 and not caps.netem:
            msg = (
                "--delay needs the netem qdisc, which this kernel lacks (CONFIG_NET_SCH_NETEM; "
                "on a stock kernel 'modprobe sch_netem', on Debian/Ubuntu it ships in "
                "linux-image-*/linux-modules-extra-*)"
            )
            if not cfg.allow_no_delay:
                raise SimClusterError(msg + "; use --delay 0, or --allow-no-delay to go on")
            log.warning("%s: running WITHOUT delay", msg)
            self.delay_applied_s = 0.0
        stale = [
            ns
            for ns in list_namespaces(cfg.prefix)
            if (m := re.match(re.escape(cfg.prefix) + r"(\d+)s", ns))
            and not _pid_alive(int(m.group(1)))
        ]
        if stale:
            log.warning(
                "%d namespaces left by dead runs (e.g. %s): remove them with --cleanup-stale",
                len(stale),
                stale[0],
            )
        atexit.register(self.teardown)
        self._up = True
        br = self.bridge_ns
        self._add_ns(br)
        _sh(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _sh(["ip", "-n", br, "link", "set", "br0", "up"])
        _sh(["ip", "-n", br, "link", "set", "lo", "up"])
        for rank in range(cfg.nodes):
            ns, port = self.node_ns(rank), f"n{rank}"
            self._add_ns(ns)
            # Created inside the bridge namespace with the peer moved straight into the node's:
            # no interface ever appears in the host's namespace, so names cannot clash.
            _sh(f"ip -n {br} link add {port} type veth peer name {NODE_IFNAME} netns {ns}".split())
            _sh(["ip", "-n", br, "link", "set", port, "master", "br0"])
            _sh(["ip", "-n", br, "link", "set", port, "up"])
            _sh(["ip", "-n", ns, "addr", "add", f"{node_addr(rank)}/24", "dev", NODE_IFNAME])
            _sh(["ip", "-n", ns, "link", "set", NODE_IFNAME, "up"])
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            self._shape(ns, NODE_IFNAME)  # what the node sends
            self._shape(br, port)  # what the node receives
            self._write_etc(rank)
        log.info(
            "%d nodes up (%s): bandwidth %s, one-way delay %s ms, master %s:%d",
            cfg.nodes,
            self.name,
            format_rate(cfg.bandwidth_bit_s),
            f"{self.delay_applied_s * 1e3:g}",
            cfg.master_addr,
            cfg.master_port,
        )

    def _write_etc(self, rank: int) -> None:
        """Per-node /etc/hosts and /etc/resolv.conf (``ip netns exec`` bind-mounts
        /etc/netns/<ns>/*): ``node<i>`` resolves to node i's address on every node, like
        host names on a real cluster (each command also gets its own host name ``node<rank>``,
        see :meth:`exec_argv`); no name server, so look-ups of other names fail at once
        instead of waiting for a DNS timeout."""
        etc = _ETC_NETNS / self.node_ns(rank)
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"]
        lines += [f"{node_addr(r)} node{r}" for r in range(self.config.nodes)]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "resolv.conf").write_text("# simcluster node: no name server\n")

    def _add_ns(self, ns: str) -> None:
        self._created.append(ns)  # before creation: teardown also removes a half-made one
        _sh(["ip", "netns", "add", ns])

    def _shape(self, ns: str, dev: str) -> None:
        """Egress shaping of one interface: netem (half the delay) -> tbf (rate)."""
        cfg = self.config
        parent = "root"
        if self.delay_applied_s > 0:
            half_us = max(1, round(self.delay_applied_s / 2 * 1e6))
            netem = f"netem delay {half_us}us limit 100000"
            _sh(f"tc -n {ns} qdisc add dev {dev} root handle 1: {netem}".split())
            parent = "parent 1:1"
        if cfg.bandwidth_bit_s is not None:
            rate = int(cfg.bandwidth_bit_s)
            # Bucket of 1 ms at line rate, at least one 64 KiB GSO packet: smaller buckets
            # under-deliver at 10 Gbit/s, larger ones let bursts through at low rates.
            burst = max(65536, rate // 8 // 1000)
            latency_us = max(1000, round(cfg.queue_s * 1e6))
            tbf = f"tbf rate {rate}bit burst {burst} latency {latency_us}us"
            _sh(f"tc -n {ns} qdisc add dev {dev} {parent} handle 10: {tbf}".split())

    def teardown(self) -> None:
        """Stop every process in the cluster and delete its namespaces (idempotent)."""
        if not self._up:
            return
        with _signals_deferred():
            for proc in self._procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
            ours = [
                ns
                for ns in list_namespaces(self.name)
                if re.fullmatch(re.escape(self.name) + r"(?:n\d+|br)", ns)
            ]
            failed = _delete_namespaces(sorted(set(ours) | set(self._created)))
            self._created.clear()
            for proc in self._procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=_CMD_TIMEOUT_S)
            self._procs.clear()
            self._up = False
            atexit.unregister(self.teardown)
        if failed:
            raise SimClusterError(f"could not delete namespaces {failed}")
        log.info("cleaned up %s (%d namespaces)", self.name, len(ours))

    # -- measuring the link -------------------------------------------------------------------
    def measure_link(
        self, src: int = 0, dst: int = 1, duration_s: float = 1.0, *, port: int = _PROBE_PORT
    ) -> LinkMeasurement:
        """Stream TCP from node ``src`` to node ``dst`` for ``duration_s``; measure rate and RTT.

        Thread-safe: probes with different ``port`` may run at once (e.g. two senders to one
        receiver, which the receiver's bridge-port limiter caps at one link rate together).
        """
        if not self._up:
            raise SimClusterError("measure_link() needs a cluster that is set up")
        if not (0 <= src < self.config.nodes and 0 <= dst < self.config.nodes and src != dst):
            raise ValueError(
                f"src={src}, dst={dst} must be two different ranks below nodes={self.config.nodes}"
            )
        args = [str(port), str(duration_s)]
        py = [sys.executable, "-c", _PROBE_SOURCE]
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.node_ns(dst), *py, "server", node_addr(dst), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._procs.append(server)
        try:
            client = subprocess.run(
                ["ip", "netns", "exec", self.node_ns(src), *py, "client", node_addr(dst), *args],
                check=False,
                capture_output=True,
                text=True,
                timeout=duration_s + 30,
            )
            out, err = server.communicate(timeout=duration_s + 30)
        except subprocess.TimeoutExpired as e:
            raise SimClusterError(f"link probe {src}->{dst} did not finish in time") from e
        finally:
            if server.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            self._procs.remove(server)
        if client.returncode != 0 or server.returncode != 0:
            raise SimClusterError(
                f"link probe {src}->{dst} failed: client: {client.stderr.strip()[-500:]} "
                f"server: {err.decode(errors='replace').strip()[-500:]}"
            )
        recv = json.loads(out)
        sent = json.loads(client.stdout)
        return LinkMeasurement(
            src=src,
            dst=dst,
            throughput_bit_s=recv["bytes"] * 8 / max(recv["seconds"], 1e-9),
            rtt_s=sent["rtt_s"],
            seconds=recv["seconds"],
        )

    def check_link(
        self, *, min_fraction: float = 0.7, max_fraction: float = 1.3, duration_s: float = 1.0
    ) -> LinkMeasurement | None:
        """Measure node 0 -> node 1 and raise unless the rate is within the asked bounds.

        Too slow (< ``min_fraction`` of the asked rate): the machine cannot drive this rate
        (CPU-bound veth), so results would measure the CPU, not the network. Too fast
        (> ``max_fraction``): the limiter is not in effect. With an unlimited link only the
        measured rate is reported. Returns None for a one-node cluster (no link to test).
        """
        if self.config.nodes < 2:
            return None
        m = self.measure_link(0, 1, duration_s)
        asked = self.config.bandwidth_bit_s
        log.info(
            "link check node0->node1: %s measured (asked %s), rtt %.3f ms",
            format_rate(m.throughput_bit_s),
            format_rate(asked),
            m.rtt_s * 1e3,
        )
        if asked is not None:
            ratio = m.throughput_bit_s / asked
            if ratio < min_fraction:
                raise SimClusterError(
                    f"link delivers {format_rate(m.throughput_bit_s)}, {ratio:.0%} of the asked "
                    f"{format_rate(asked)} (< {min_fraction:.0%}): this machine cannot drive "
                    "that rate (busy or too few cores); ask for less bandwidth, or pass "
                    "--check warn"
                )
            if ratio > max_fraction:
                raise SimClusterError(
                    f"link delivers {format_rate(m.throughput_bit_s)}, {ratio:.0%} of the asked "
                    f"{format_rate(asked)}: the rate limiter is not in effect"
                )
        if self.delay_applied_s > 0 and m.rtt_s < 2 * self.delay_applied_s * 0.8:
            raise SimClusterError(
                f"round trip {m.rtt_s * 1e3:.3f} ms is below twice the asked one-way delay "
                f"({self.delay_applied_s * 1e3:g} ms): netem is not in effect"
            )
        return m

    # -- running a command ------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float = 600.0,
        fail_grace_s: float = 5.0,
        on_line: Callable[[int, str], None] | None = None,
    ) -> ClusterResult:
        """Run ``argv`` on every node at once (placeholders filled per node) and wait.

        ``on_line(rank, line)`` gets each output line as it arrives (default: print it to
        stdout as ``[node<rank>] line``). When a node fails, the others get ``fail_grace_s``
        seconds to finish before they are stopped (a torchrun peer would otherwise wait for
        its rendezvous timeout); after ``timeout_s`` all are stopped and ``timed_out`` is set.
        """
        if not self._up:
            raise SimClusterError("run() needs a cluster that is set up")
        if not argv:
            raise ValueError("argv is empty: give the command to run on every node")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0 seconds")
        emit = on_line or _print_line
        n = self.config.nodes
        lines: list[list[str]] = [[] for _ in range(n)]
        procs: list[subprocess.Popen[bytes]] = []
        readers = []
        start = time.monotonic()
        for rank in range(n):
            proc = subprocess.Popen(
                self.exec_argv(rank, argv),
                env=self.node_env(rank),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop the nodes ourselves
            )
            procs.append(proc)
            self._procs.append(proc)
            t = threading.Thread(target=_pump, args=(proc, rank, lines[rank], emit), daemon=True)
            t.start()
            readers.append(t)
        killed = [False] * n
        timed_out = False
        kill_at = start + timeout_s
        try:
            while None in (codes := [p.poll() for p in procs]):  # poll all: no short cut
                now = time.monotonic()
                if any(c not in (None, 0) for c in codes):
                    kill_at = min(kill_at, now + fail_grace_s)
                if now >= kill_at:
                    timed_out = now >= start + timeout_s
                    for rank, p in enumerate(procs):
                        killed[rank] = p.poll() is None
                    self._stop_nodes(procs)
                    break
                time.sleep(0.05)
        except BaseException:
            self._stop_nodes(procs)
            raise
        finally:
            # What the command left running (daemons, orphaned workers) goes with it.
            _kill_in_namespaces([self.node_ns(r) for r in range(n)])
            for t in readers:
                t.join(timeout=5)
            for p in procs:
                self._procs.remove(p)
        return ClusterResult(
            nodes=[
                NodeResult(
                    rank=r, returncode=p.returncode, output="".join(lines[r]), killed=killed[r]
                )
                for r, p in enumerate(procs)
            ],
            timed_out=timed_out,
            seconds=time.monotonic() - start,
        )

    def _stop_nodes(self, procs: Sequence[subprocess.Popen[bytes]]) -> None:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        _kill_in_namespaces([self.node_ns(r) for r in range(self.config.nodes)])
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=_CMD_TIMEOUT_S)


_print_lock = threading.Lock()


def _print_line(rank: int, line: str) -> None:
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


# ---------------------------------------------------------------------------------------------
# Signals: SIGTERM/SIGHUP/SIGINT unwind through `finally`; teardown is not interrupted
# ---------------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM/SIGHUP once :func:`main` installed handlers."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_deferred: list[int] | None = None


def _on_signal(signum: int, frame: object) -> None:
    if _deferred is not None:
        _deferred.append(signum)  # during teardown: finish cleaning up first
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    global _deferred
    if _deferred is not None:  # nested
        yield
        return
    _deferred = []
    try:
        yield
    finally:
        pending, _deferred = _deferred, None
        if pending:
            raise Interrupted(pending[0])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
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


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0, the failing node's code, 124 on timeout)."""
    args = _parser().parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[simcluster] %(message)s",
        stream=sys.stderr,
    )
    try:
        config = SimClusterConfig(
            nodes=args.nodes,
            bandwidth_bit_s=parse_rate(args.bandwidth),
            delay_s=parse_time(args.delay),
            allow_no_delay=args.allow_no_delay,
            master_port=args.master_port,
            prefix=args.prefix,
        )
    except (ValueError, TypeError) as e:
        print(f"simcluster: {e}", file=sys.stderr)
        return 2
    if not args.timeout > 0:
        print(f"simcluster: --timeout {args.timeout} must be > 0 seconds", file=sys.stderr)
        return 2
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s in handlers:
        signal.signal(s, _on_signal)
    try:
        problems = check_environment()
        if problems:
            print("simcluster: cannot simulate a cluster here:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return 2
        if args.cleanup_stale:
            removed = cleanup_stale(args.prefix)
            log.info(
                "removed %d stale namespaces%s",
                len(removed),
                f": {' '.join(removed)}" if removed else "",
            )
            if not command:
                return 0
        with SimCluster(config) as cluster:
            if args.check != "off":
                try:
                    cluster.check_link(duration_s=args.check_seconds)  # logs the measured rate
                except SimClusterError as e:
                    if args.check == "fail":
                        raise
                    log.warning("link check: %s", e)
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
    except SimClusterError as e:
        print(f"simcluster: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        print(f"simcluster: interrupted by {e}; cleaned up", file=sys.stderr)
        return 128 + e.signum
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
