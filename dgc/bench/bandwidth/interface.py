"""Bytes on the wire, from the kernel: the byte counters of the interface the collectives use."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

__all__ = ["InterfaceBytes", "barrier_traffic", "default_iface", "interface_bytes"]


@dataclass(kw_only=True, slots=True, frozen=True)
class InterfaceBytes:
    """Counters of one interface (``/proc/net/dev`` of this network namespace)."""

    rx: int
    """Bytes received."""
    tx: int
    """Bytes transmitted."""

    def __sub__(self, other: InterfaceBytes) -> InterfaceBytes:
        return InterfaceBytes(rx=self.rx - other.rx, tx=self.tx - other.tx)

    def __add__(self, other: InterfaceBytes) -> InterfaceBytes:
        return InterfaceBytes(rx=self.rx + other.rx, tx=self.tx + other.tx)


def interface_bytes(iface: str) -> InterfaceBytes:
    """The received and transmitted byte counters of ``iface`` in this network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, data = line.partition(":")
        if name.strip() == iface:
            fields = data.split()
            return InterfaceBytes(rx=int(fields[0]), tx=int(fields[8]))
    raise ValueError(
        f"interface {iface!r} is not in /proc/net/dev of this network namespace: pass --iface "
        "with the interface the collectives use (ip -br link)"
    )


def _default_route_iface() -> str | None:
    try:
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 1 and fields[1] == "00000000":
                return fields[0]
    except OSError:
        pass
    return None


def default_iface(backend: str) -> str:
    """The interface the collectives use: $GLOO_SOCKET_IFNAME / $NCCL_SOCKET_IFNAME when they name
    one (not an exclusion list like ``^docker``; the ``backend``'s own variable first), else the
    default route's on a multi-node run, else ``lo``."""
    order = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
    for var in order if backend == "gloo" else order[::-1]:
        value = os.environ.get(var, "").split(",")[0].strip()
        if value and not value.startswith("^"):
            return value.lstrip("=")
    if os.environ.get("LOCAL_WORLD_SIZE", "1") != os.environ.get("WORLD_SIZE", "1"):  # multi-node
        return _default_route_iface() or "lo"
    return "lo"


def barrier_traffic(iface: str, count: int) -> InterfaceBytes:
    """Bytes ``count`` barriers of the default group move (the measured steps' own barriers,
    subtracted from them)."""
    dist.barrier()
    before = interface_bytes(iface)
    for _ in range(count):
        dist.barrier()
    return interface_bytes(iface) - before
