"""The simulated cluster: N network namespaces joined by a bridge, with shaped links.

Each node is a namespace with one interface ``eth0`` (address 198.18.0.<rank+1>/24, inside
198.18.0.0/15, the range RFC 2544 reserves for benchmarking) plugged into a bridge that lives in
a namespace of its own, so nothing is added to the host's network. Both ends of every link are
shaped (:mod:`.shaping`): the node's ``eth0`` (what it sends) and its bridge port (what it
receives). See docs/simcluster.md.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import subprocess
from collections.abc import Callable, Sequence

from .capabilities import capabilities
from .config import NODE_IFNAME, PROBE_PORT, SimClusterConfig, node_addr, substitute_placeholders
from .errors import SimClusterError
from .namespaces import (
    CMD_TIMEOUT_S,
    ETC_NETNS,
    delete_namespaces,
    list_namespaces,
    next_seq,
    sh,
    stale_namespaces,
)
from .rates import format_rate
from .results import ClusterResult, LinkMeasurement
from .runner import NodeLaunch, print_line, run_on_nodes
from .shaping import shaping_commands
from .signals import signals_deferred

__all__ = ["SimCluster"]

log = logging.getLogger("dgc.simcluster")

_NETEM_MISSING = (
    "--delay needs the netem qdisc, which this kernel lacks (CONFIG_NET_SCH_NETEM; "
    "on a stock kernel 'modprobe sch_netem', on Debian/Ubuntu it ships in "
    "linux-image-*/linux-modules-extra-*)"
)


class SimCluster:
    """N network namespaces joined by a bridge, with shaped links; a context manager.

    ``with SimCluster(cfg) as c:`` builds everything (:meth:`setup`) and always tears it down
    (:meth:`teardown`), also on exceptions; an ``atexit`` hook is a second line of defence for
    code that does not use ``with``.
    """

    def __init__(self, config: SimClusterConfig) -> None:
        self.config = config
        self.name = f"{config.prefix}{os.getpid()}s{next_seq()}"
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
            *self._in_node(rank, ["unshare", "--uts", "--", "sh", "-c", set_hostname]),
            f"node{rank}",
            *substitute_placeholders(argv, self.placeholders(rank)),
        ]

    def _in_node(self, rank: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.node_ns(rank), *argv]

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

    def _check_machine(self) -> None:
        """Raise if this machine cannot build the cluster; set the delay netem can give."""
        cfg = self.config
        caps = capabilities(prefix=cfg.prefix)
        if caps.problems:
            raise SimClusterError(
                "cannot simulate a cluster here:\n  " + "\n  ".join(caps.problems)
            )
        self.delay_applied_s = cfg.delay_s
        if cfg.delay_s > 0 and not caps.netem:
            if not cfg.allow_no_delay:
                raise SimClusterError(_NETEM_MISSING + "; use --delay 0, or --allow-no-delay to go on")
            log.warning("%s: running WITHOUT delay", _NETEM_MISSING)
            self.delay_applied_s = 0.0
        stale = stale_namespaces(cfg.prefix)
        if stale:
            log.warning(
                "%d namespaces left by dead runs (e.g. %s): remove them with --cleanup-stale",
                len(stale),
                stale[0],
            )

    def setup(self) -> None:
        """Check the machine, then create namespaces, bridge, veth pairs, addresses and qdiscs."""
        self._check_machine()
        cfg = self.config
        atexit.register(self.teardown)
        self._up = True
        br = self.bridge_ns
        self._add_ns(br)
        sh(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        sh(["ip", "-n", br, "link", "set", "br0", "up"])
        sh(["ip", "-n", br, "link", "set", "lo", "up"])
        for rank in range(cfg.nodes):
            self._add_node(rank)
        log.info(
            "%d nodes up (%s): bandwidth %s, one-way delay %s ms, master %s:%d",
            cfg.nodes,
            self.name,
            format_rate(cfg.bandwidth_bit_s),
            f"{self.delay_applied_s * 1e3:g}",
            cfg.master_addr,
            cfg.master_port,
        )

    def _add_node(self, rank: int) -> None:
        br, ns, port = self.bridge_ns, self.node_ns(rank), f"n{rank}"
        self._add_ns(ns)
        # Created inside the bridge namespace with the peer moved straight into the node's:
        # no interface ever appears in the host's namespace, so names cannot clash.
        sh(f"ip -n {br} link add {port} type veth peer name {NODE_IFNAME} netns {ns}".split())
        sh(["ip", "-n", br, "link", "set", port, "master", "br0"])
        sh(["ip", "-n", br, "link", "set", port, "up"])
        sh(["ip", "-n", ns, "addr", "add", f"{node_addr(rank)}/24", "dev", NODE_IFNAME])
        sh(["ip", "-n", ns, "link", "set", NODE_IFNAME, "up"])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        self.shape(ns, NODE_IFNAME)  # what the node sends
        self.shape(br, port)  # what the node receives
        self._write_etc(rank)

    def _write_etc(self, rank: int) -> None:
        """Per-node /etc/hosts and /etc/resolv.conf (``ip netns exec`` bind-mounts
        /etc/netns/<ns>/*): ``node<i>`` resolves to node i's address on every node, like
        host names on a real cluster (each command also gets its own host name ``node<rank>``,
        see :meth:`exec_argv`); no name server, so look-ups of other names fail at once
        instead of waiting for a DNS timeout."""
        etc = ETC_NETNS / self.node_ns(rank)
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"]
        lines += [f"{node_addr(r)} node{r}" for r in range(self.config.nodes)]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "resolv.conf").write_text("# simcluster node: no name server\n")

    def _add_ns(self, ns: str) -> None:
        self._created.append(ns)  # before creation: teardown also removes a half-made one
        sh(["ip", "netns", "add", ns])

    def shape(self, ns: str, dev: str) -> None:
        """Egress shaping of one interface: netem (half the delay) -> tbf (rate)."""
        for cmd in shaping_commands(
            ns,
            dev,
            bandwidth_bit_s=self.config.bandwidth_bit_s,
            delay_s=self.delay_applied_s,
            queue_s=self.config.queue_s,
        ):
            sh(cmd)

    def teardown(self) -> None:
        """Stop every process in the cluster and delete its namespaces (idempotent)."""
        if not self._up:
            return
        with signals_deferred():
            for proc in self._procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
            ours = [
                ns
                for ns in list_namespaces(self.name)
                if re.fullmatch(re.escape(self.name) + r"(?:n\d+|br)", ns)
            ]
            failed = delete_namespaces(sorted(set(ours) | set(self._created)))
            self._created.clear()
            for proc in self._procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=CMD_TIMEOUT_S)
            self._procs.clear()
            self._up = False
            atexit.unregister(self.teardown)
        if failed:
            raise SimClusterError(f"could not delete namespaces {failed}")
        log.info("cleaned up %s (%d namespaces)", self.name, len(ours))

    # -- measuring the link -------------------------------------------------------------------
    def measure_link(
        self, src: int = 0, dst: int = 1, duration_s: float = 1.0, *, port: int = PROBE_PORT
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
        from . import probe  # not at import: `python -m dgc.bench.simcluster.probe` runs it

        return probe.measure_link(
            self._in_node, src, dst, node_addr(dst), duration_s, port=port, track=self._procs
        )

    def check_link(
        self, *, min_fraction: float = 0.7, max_fraction: float = 1.3, duration_s: float = 1.0
    ) -> LinkMeasurement | None:
        """Measure node 0 -> node 1 and raise unless the rate is within the asked bounds
        (:func:`probe.check_measurement`). Returns None for a one-node cluster (no link)."""
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
        from .probe import check_measurement

        check_measurement(
            m,
            asked_bit_s=asked,
            delay_s=self.delay_applied_s,
            min_fraction=min_fraction,
            max_fraction=max_fraction,
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
        extra_env: dict[str, str] | None = None,
    ) -> ClusterResult:
        """Run ``argv`` on every node at once (placeholders filled per node) and wait.

        ``on_line(rank, line)`` gets each output line as it arrives (default: print it to
        stdout as ``[node<rank>] line``). When a node fails, the others get ``fail_grace_s``
        seconds to finish before they are stopped (a torchrun peer would otherwise wait for
        its rendezvous timeout); after ``timeout_s`` all are stopped and ``timed_out`` is set.
        ``extra_env`` is added to every node's environment (:meth:`node_env`).
        """
        if not self._up:
            raise SimClusterError("run() needs a cluster that is set up")
        if not argv:
            raise ValueError("argv is empty: give the command to run on every node")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0 seconds")
        launches = [
            NodeLaunch(argv=self.exec_argv(r, argv), env={**self.node_env(r), **(extra_env or {})},
                       namespace=self.node_ns(r))
            for r in range(self.config.nodes)
        ]
        return run_on_nodes(
            launches,
            timeout_s=timeout_s,
            fail_grace_s=fail_grace_s,
            on_line=on_line or print_line,
            track=self._procs,
        )
