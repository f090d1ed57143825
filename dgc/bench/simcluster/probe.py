"""The link probe: a TCP stream from one node to another, and a 1-byte ping-pong for the RTT.

Run inside the nodes' namespaces as a module with the same Python as the caller::

    python -m dgc.bench.simcluster.probe server HOST PORT SECONDS   # prints {"bytes", "seconds"}
    python -m dgc.bench.simcluster.probe client HOST PORT SECONDS   # prints {"rtt_s"}

:func:`measure_link` starts both ends in two nodes and returns a :class:`LinkMeasurement`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from .config import PROBE_PORT
from .errors import SimClusterError
from .rates import format_rate
from .results import LinkMeasurement

__all__ = ["PROBE_PORT", "check_measurement", "main", "measure_link", "receive", "send"]

_PINGS = 50
_CHUNK = 1 << 20


def receive(host: str, port: int, duration_s: float) -> dict[str, float]:
    """Server side: echo the client's pings, then count the bytes of its stream."""
    srv = socket.create_server((host, port))
    srv.settimeout(duration_s + 20)
    conn, _ = srv.accept()  # phase 1: echo 1-byte pings
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while b := conn.recv(1):
        conn.sendall(b)
    conn.close()
    conn, _ = srv.accept()  # phase 2: count a stream
    conn.settimeout(duration_s + 20)
    buf = bytearray(_CHUNK)
    conn.recv_into(buf)  # the clock starts once the stream flows
    t0 = time.perf_counter()
    n = 0
    while r := conn.recv_into(buf):
        n += r
    return {"bytes": n, "seconds": time.perf_counter() - t0}


def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
    end = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout_s)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


def send(host: str, port: int, duration_s: float) -> dict[str, float]:
    """Client side: 50 pings (median RTT), then a stream of 1 MiB writes for ``duration_s``."""
    conn = _connect(host, port, duration_s + 20)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(_PINGS):
        t = time.perf_counter()
        conn.sendall(b"x")
        conn.recv(1)
        rtts.append(time.perf_counter() - t)
    conn.close()
    conn = _connect(host, port, duration_s + 20)
    data = b"\0" * _CHUNK
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end:
        conn.sendall(data)
    conn.close()
    return {"rtt_s": statistics.median(rtts)}


def measure_link(
    in_node: Callable[[int, Sequence[str]], list[str]],
    src: int,
    dst: int,
    dst_addr: str,
    duration_s: float = 1.0,
    *,
    port: int = PROBE_PORT,
    track: list[subprocess.Popen[bytes]] | None = None,
) -> LinkMeasurement:
    """Stream from node ``src`` to node ``dst`` (address ``dst_addr``) for ``duration_s``.

    ``in_node(rank, argv)`` is the command line that runs ``argv`` in node ``rank``; the server
    process is appended to ``track`` while it runs (so a teardown can kill it).
    """
    probe = [sys.executable, "-m", __name__]
    args = [dst_addr, str(port), str(duration_s)]
    server = subprocess.Popen(
        in_node(dst, [*probe, "server", *args]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    tracked = track if track is not None else []
    tracked.append(server)
    try:
        client = subprocess.run(
            in_node(src, [*probe, "client", *args]),
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
        tracked.remove(server)
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


def check_measurement(
    m: LinkMeasurement,
    *,
    asked_bit_s: float | None,
    delay_s: float,
    min_fraction: float = 0.7,
    max_fraction: float = 1.3,
) -> None:
    """Raise unless ``m`` delivers what was asked.

    Too slow (< ``min_fraction`` of the asked rate): the machine cannot drive this rate
    (CPU-bound veth), so results would measure the CPU, not the network. Too fast
    (> ``max_fraction``): the limiter is not in effect. A round trip under 80% of twice the
    one-way ``delay_s``: netem is not in effect. An unlimited link (``asked_bit_s`` None) only
    has its delay checked.
    """
    if asked_bit_s is not None:
        ratio = m.throughput_bit_s / asked_bit_s
        if ratio < min_fraction:
            raise SimClusterError(
                f"link delivers {format_rate(m.throughput_bit_s)}, {ratio:.0%} of the asked "
                f"{format_rate(asked_bit_s)} (< {min_fraction:.0%}): this machine cannot drive "
                "that rate (busy or too few cores); ask for less bandwidth, or pass "
                "--check warn"
            )
        if ratio > max_fraction:
            raise SimClusterError(
                f"link delivers {format_rate(m.throughput_bit_s)}, {ratio:.0%} of the asked "
                f"{format_rate(asked_bit_s)}: the rate limiter is not in effect"
            )
    if delay_s > 0 and m.rtt_s < 2 * delay_s * 0.8:
        raise SimClusterError(
            f"round trip {m.rtt_s * 1e3:.3f} ms is below twice the asked one-way delay "
            f"({delay_s * 1e3:g} ms): netem is not in effect"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``server|client HOST PORT SECONDS``: run one end, print its figures as JSON."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 4 or args[0] not in ("server", "client"):
        sys.stderr.write("usage: python -m dgc.bench.simcluster.probe server|client HOST PORT "
                         "SECONDS\n")
        return 2
    role, host, port, duration = args[0], args[1], int(args[2]), float(args[3])
    result = receive(host, port, duration) if role == "server" else send(host, port, duration)
    sys.stdout.write(json.dumps(result) + "\n")  # the result, read by measure_link
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
