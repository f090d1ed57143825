"""Tests of the simulated multi-node cluster (dgc.bench.simcluster, launch/simcluster.py).

The cluster tests need root, iproute2 and network namespaces; without them they are skipped with
the reason (set DGC_REQUIRE_NETNS=1, e.g. in CI, to make that a failure instead). Each checks
that nothing (namespace, /etc/netns entry, process) is left behind, on success and on failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dgc.bench import simcluster as sc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "simcluster.py"

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def netns() -> None:
    problems = sc.check_environment()
    if problems:
        reason = "simulated cluster unavailable: " + "; ".join(problems)
        if os.environ.get("DGC_REQUIRE_NETNS") == "1":
            pytest.fail(reason + " (DGC_REQUIRE_NETNS=1)")
        pytest.skip(reason)


def leftovers(name_prefix: str) -> list[str]:
    """Namespaces and /etc/netns entries whose name starts with name_prefix."""
    found = sc.list_namespaces(name_prefix)
    etc = Path("/etc/netns")
    if etc.is_dir():
        found += [f"/etc/netns/{p.name}" for p in etc.iterdir() if p.name.startswith(name_prefix)]
    return found


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose command line contains marker."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def sleeper_with_orphan(marker: str) -> list[str]:
    """A command that starts a grandchild in a session of its own (as torchrun does with its
    workers) and sleeps; both carry marker on their command line."""
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', sys.argv[1]],"
        " start_new_session=True)\n"
        "print('up', flush=True)\n"
        "time.sleep(120)\n"
    )
    return [sys.executable, "-c", code, marker]


def run_cli(args: list[str], timeout: float) -> tuple[int, str, str, int]:
    """Run simcluster.py; returns (exit code, stdout, stderr, its pid)."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # simcluster cleans up on SIGTERM
        proc.communicate(timeout=30)
        raise
    return proc.returncode, out, err, proc.pid


# --------------------------------------------------------------------------------------------
# Parsing and validation (no root needed)
# --------------------------------------------------------------------------------------------


def test_parse_rate_and_time() -> None:
    assert sc.parse_rate("1gbit") == 1e9
    assert sc.parse_rate("2.5Gbit") == 2.5e9
    assert sc.parse_rate("100mbit") == 1e8
    assert sc.parse_rate("unlimited") is None
    assert sc.parse_time("0.2ms") == pytest.approx(2e-4)
    assert sc.parse_time("50us") == pytest.approx(5e-5)
    assert sc.parse_time("0") == 0.0
    for bad in ("1gbps", "fast", "0gbit", "-1mbit", ""):
        with pytest.raises(ValueError, match="bandwidth"):
            sc.parse_rate(bad)
    for bad in ("1", "2 hours", "ms"):
        with pytest.raises(ValueError, match="delay"):
            sc.parse_time(bad)


def test_substitute_placeholders_touches_only_known_names() -> None:
    argv = ["--node_rank", "{node_rank}", "{master_addr}:{master_port}", '{"a": 1}', "${HOME}"]
    values = {"node_rank": 3, "master_addr": "198.18.0.1", "master_port": 29500}
    assert sc.substitute_placeholders(argv, values) == [
        "--node_rank",
        "3",
        "198.18.0.1:29500",
        '{"a": 1}',
        "${HOME}",
    ]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"nodes": 0}, ValueError, "nodes"),
        ({"nodes": 251}, ValueError, "nodes"),
        ({"nodes": 2.0}, TypeError, "nodes"),
        ({"bandwidth_bit_s": 0.0}, ValueError, "bandwidth_bit_s"),
        ({"delay_s": -1e-3}, ValueError, "delay_s"),
        ({"master_port": 0}, ValueError, "master_port"),
        ({"prefix": "Bad-Prefix"}, ValueError, "prefix"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        sc.SimClusterConfig(**kwargs)


def test_exit_code_prefers_nodes_that_failed_by_themselves() -> None:
    def result(*nodes: tuple[int, bool], timed_out: bool = False) -> sc.ClusterResult:
        return sc.ClusterResult(
            nodes=[
                sc.NodeResult(rank=i, returncode=c, output="", killed=k)
                for i, (c, k) in enumerate(nodes)
            ],
            timed_out=timed_out,
        )

    assert result((0, False), (0, False)).exit_code == 0
    assert result((-15, True), (7, False)).exit_code == 7
    assert result((-9, False), (0, False)).exit_code == 137
    assert result((-15, True), (-15, True), timed_out=True).exit_code == 124
    assert not result((0, False), (1, False)).ok


def test_missing_tools_are_named_with_the_package() -> None:
    problems = sc.check_environment(path="/nonexistent")
    assert any("apt-get install iproute2 util-linux" in p for p in problems), problems


def test_cli_rejects_bad_bandwidth_before_touching_the_network() -> None:
    code, _, err, _ = run_cli(["--bandwidth", "1gbps", "--", "true"], timeout=30)
    assert code == 2
    assert "bandwidth" in err and "gbit" in err


# --------------------------------------------------------------------------------------------
# The cluster itself (root + network namespaces)
# --------------------------------------------------------------------------------------------

_ECHO = textwrap.dedent(
    """
    import socket, sys
    rank, nnodes, master = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    me = socket.gethostbyname(socket.gethostname())
    print(f"host {socket.gethostname()} addr {me}", flush=True)
    if rank == 0:
        srv = socket.create_server((master, 7777))
        srv.settimeout(30)
        for _ in range(nnodes - 1):
            conn, peer = srv.accept()
            msg = conn.recv(100)
            conn.sendall(b"echo: " + msg)
            print(f"peer {peer[0]} said {msg.decode()}", flush=True)
            conn.close()
    else:
        for _ in range(500):
            try:
                conn = socket.create_connection((master, 7777), timeout=30)
                break
            except OSError:
                import time; time.sleep(0.02)
        conn.sendall(f"hello from {rank}".encode())
        print(conn.recv(100).decode(), flush=True)
    """
)


@pytest.mark.timeout(60)
def test_nodes_reach_each_other_and_leave_nothing_behind(netns: None) -> None:
    cfg = sc.SimClusterConfig(nodes=3, bandwidth_bit_s=1e9)
    with sc.SimCluster(cfg) as cluster:
        name = cluster.name
        assert sorted(leftovers(name)) == sorted(
            [f"{name}br", f"{name}n0", f"{name}n1", f"{name}n2"]
            + [f"/etc/netns/{name}n{i}" for i in range(3)]
        )
        # Both ends of every link are shaped: node egress (send) and bridge port (receive).
        for ns, dev in [(cluster.node_ns(1), "eth0"), (cluster.bridge_ns, "n1")]:
            qdiscs = subprocess.run(
                ["tc", "-n", ns, "qdisc", "show", "dev", dev],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert "tbf" in qdiscs and "rate 1Gbit" in qdiscs, (ns, dev, qdiscs)
        result = cluster.run(
            [sys.executable, "-c", _ECHO, "{node_rank}", "{nnodes}", "{master_addr}"],
            timeout_s=40,
            on_line=lambda rank, line: None,
        )
    assert result.ok, [n.output for n in result.nodes]
    out = [n.output for n in result.nodes]
    for rank in range(3):
        assert f"host node{rank} addr 198.18.0.{rank + 1}" in out[rank]
    assert "peer 198.18.0.2 said hello from 1" in out[0]
    assert "peer 198.18.0.3 said hello from 2" in out[0]
    assert "echo: hello from 1" in out[1] and "echo: hello from 2" in out[2]
    assert leftovers(name) == []


_ALLREDUCE = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    print(f"rank {dist.get_rank()}/{dist.get_world_size()} sum {t.item()}", flush=True)
    dist.destroy_process_group()
    """
)


@pytest.mark.timeout(120)
def test_torchrun_gloo_allreduce_across_two_nodes(netns: None, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    script = tmp_path / "allreduce.py"
    script.write_text(_ALLREDUCE)
    code, out, err, pid = run_cli(
        [
            "--nodes",
            "2",
            "--bandwidth",
            "1gbit",
            "--timeout",
            "90",
            "--",
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "{nnodes}",
            "--node_rank",
            "{node_rank}",
            "--nproc_per_node",
            "1",
            "--master_addr",
            "{master_addr}",
            "--master_port",
            "{master_port}",
            str(script),
        ],
        timeout=110,
    )
    assert code == 0, out[-3000:] + err[-3000:]
    assert "link check node0->node1" in err and "measured" in err
    assert "[node0] rank 0/2 sum 3.0" in out
    assert "[node1] rank 1/2 sum 3.0" in out
    assert "cleaned up" in err
    assert leftovers(f"dgcsim{pid}") == []


@pytest.mark.timeout(60)
def test_failing_node_stops_the_others_and_cleans_up(netns: None) -> None:
    marker = f"dgcsim-test-{uuid.uuid4().hex}"
    fail_on_1 = [
        "sh",
        "-c",
        'if [ {node_rank} = 1 ]; then echo failing; exit 7; fi; exec "$@"',
        "sh",
        *sleeper_with_orphan(marker),
    ]
    with sc.SimCluster(sc.SimClusterConfig(nodes=2, bandwidth_bit_s=None)) as cluster:
        name = cluster.name
        result = cluster.run(
            fail_on_1, timeout_s=50, fail_grace_s=0.5, on_line=lambda rank, line: None
        )
    assert not result.ok and not result.timed_out
    assert result.nodes[1].returncode == 7 and not result.nodes[1].killed
    assert result.nodes[0].killed and result.nodes[0].returncode != 0
    assert result.exit_code == 7
    assert leftovers(name) == []
    assert processes_with(marker) == []


@pytest.mark.timeout(60)
def test_timeout_stops_every_process_and_cleans_up(netns: None) -> None:
    marker = f"dgcsim-test-{uuid.uuid4().hex}"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--check",
            "off",
            "--timeout",
            "3",
            "--",
            *sleeper_with_orphan(marker),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=50)
    assert proc.returncode == 124, out + err
    assert out.count("] up") == 2, out  # the command really ran on both nodes
    assert "timed out" in err
    assert leftovers(f"dgcsim{proc.pid}") == []
    assert processes_with(marker) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_every_process_and_cleans_up(netns: None, sig: int, code: int) -> None:
    marker = f"dgcsim-test-{uuid.uuid4().hex}"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--check",
            "off",
            "--timeout",
            "50",
            "--",
            *sleeper_with_orphan(marker),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen = 0
    while seen < 2:  # both nodes started (and spawned their orphan)
        line = proc.stdout.readline()
        assert line, "simcluster exited before the nodes came up: " + proc.stderr.read()
        seen += line.endswith("] up\n")
    assert len(processes_with(marker)) >= 4
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, out + err
    assert "interrupted" in err
    assert leftovers(f"dgcsim{proc.pid}") == []
    assert processes_with(marker) == []


@pytest.mark.timeout(60)
def test_rate_limited_link_is_slower_than_unlimited(netns: None) -> None:
    asked = 100e6
    with sc.SimCluster(sc.SimClusterConfig(nodes=2, bandwidth_bit_s=asked)) as cluster:
        forward = cluster.measure_link(0, 1, duration_s=0.7)
        backward = cluster.measure_link(1, 0, duration_s=0.7)
    with sc.SimCluster(sc.SimClusterConfig(nodes=2, bandwidth_bit_s=None)) as cluster:
        free = cluster.measure_link(0, 1, duration_s=0.7)
    for m in (forward, backward):
        assert 0.3 * asked < m.throughput_bit_s < 2 * asked, m
    assert free.throughput_bit_s > 2 * max(forward.throughput_bit_s, backward.throughput_bit_s)


@pytest.mark.timeout(60)
def test_receiving_is_limited_too(netns: None) -> None:
    """Two nodes sending to a third at once share the receiver's link: its bridge-side limiter
    caps what it receives at one link rate (each sender alone could send a full rate)."""
    asked = 100e6
    with sc.SimCluster(sc.SimClusterConfig(nodes=3, bandwidth_bit_s=asked)) as cluster:
        with ThreadPoolExecutor(2) as pool:
            probes = [
                pool.submit(cluster.measure_link, src, 0, 1.0, port=5300 + src) for src in (1, 2)
            ]
            results = [p.result() for p in probes]
    total = sum(m.throughput_bit_s for m in results)
    assert 0.3 * asked < total < 1.5 * asked, results


@pytest.mark.timeout(60)
def test_link_check_rejects_a_limiter_that_is_not_in_effect(netns: None) -> None:
    cluster = sc.SimCluster(sc.SimClusterConfig(nodes=2, bandwidth_bit_s=1e6))
    with cluster:
        # Remove both limiters behind simcluster's back: the check must notice.
        subprocess.run(
            ["tc", "-n", cluster.node_ns(0), "qdisc", "del", "dev", "eth0", "root"], check=True
        )
        subprocess.run(
            ["tc", "-n", cluster.bridge_ns, "qdisc", "del", "dev", "n1", "root"], check=True
        )
        with pytest.raises(sc.SimClusterError, match="not in effect"):
            cluster.check_link(duration_s=0.5)
    assert leftovers(cluster.name) == []


@pytest.mark.timeout(60)
def test_delay_needs_netem(netns: None) -> None:
    cfg = sc.SimClusterConfig(nodes=2, bandwidth_bit_s=None, delay_s=2e-3)
    if sc.netem_available():
        with sc.SimCluster(cfg) as cluster:
            m = cluster.measure_link(0, 1, duration_s=0.3)
        assert m.rtt_s >= 2 * 2e-3 * 0.8, m
    else:
        cluster = sc.SimCluster(cfg)
        with pytest.raises(sc.SimClusterError, match="netem"):
            cluster.__enter__()
        assert leftovers(cluster.name) == []
        relaxed = sc.SimClusterConfig(
            nodes=2, bandwidth_bit_s=None, delay_s=2e-3, allow_no_delay=True
        )
        with sc.SimCluster(relaxed) as cluster:
            assert cluster.delay_applied_s == 0.0
        assert leftovers(cluster.name) == []


@pytest.mark.timeout(60)
def test_cleanup_stale_removes_only_dead_runs(netns: None) -> None:
    dead = next(p for p in range(4194303, 4000000, -1) if not sc.pid_alive(p))
    stale, live = f"dgcsim{dead}s0n0", f"dgcsim{os.getpid()}s999n0"
    try:
        for ns in (stale, live):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        Path(f"/etc/netns/dgcsim{dead}s0n1").mkdir(parents=True)  # files of a gone namespace
        removed = sc.cleanup_stale("dgcsim")
        assert stale in removed and f"dgcsim{dead}s0n1" in removed
        assert leftovers(f"dgcsim{dead}") == []
        assert sc.list_namespaces(live) == [live]
    finally:
        subprocess.run(["ip", "netns", "del", live], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", stale], check=False, capture_output=True)


@pytest.mark.timeout(30)
def test_setup_failure_leaves_nothing_behind(netns: None, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = sc.SimCluster(sc.SimClusterConfig(nodes=2, bandwidth_bit_s=1e9))

    def broken(ns: str, dev: str) -> None:
        raise sc.SimClusterError("simulated tc failure")

    monkeypatch.setattr(cluster, "shape", broken)
    with pytest.raises(sc.SimClusterError, match="simulated"):
        cluster.__enter__()
    assert leftovers(cluster.name) == []
