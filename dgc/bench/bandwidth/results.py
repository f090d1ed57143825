"""What the worker reports per method and rank, and how ranks' figures are merged."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MethodResult", "finite", "merge_ranks"]


@dataclass(kw_only=True, slots=True)
class MethodResult:
    """Per-rank figures of one method (per step: medians for times, means for bytes)."""

    method: str
    group_size: int
    """Ranks of the process group it ran on (1 for the codec run)."""
    step_s: float
    """End-to-end step time, wall clock (median)."""
    step_s_all: list[float]
    step_cpu_s: float
    """CPU time of this process per step (all its threads): insensitive to other processes on
    the same cores, unlike step_s."""
    hook_s: float
    """Time inside the hook calls (their synchronous part: compression and launch); 0 for
    ``dense``, which has no hook (DDP's built-in allreduce)."""
    comm_inflight_s: float
    """Wall time with at least one of the step's collectives in flight (launch to completion)."""
    comm_replay_s: float = math.nan
    """The step's collectives replayed alone, best round (NaN = not replayed)."""
    tx_bytes: float = math.nan
    """Bytes the interface sent per step, barrier traffic subtracted (NaN = not measured)."""
    rx_bytes: float = math.nan
    barrier_tx_bytes: float = math.nan
    """What one step's barrier sent, measured apart and subtracted from tx_bytes."""
    payload_bytes: float = 0.0
    """Bytes this rank handed to the collectives per step (counted by the process group)."""
    stats_bytes_sent: float = 0.0
    """Bytes sent per step by the method's own account (``Communication.step_stats()``, what the
    training loop logs), last measured step."""
    collectives: int = 0
    """Collectives per step."""
    ops: list[dict[str, Any]] = field(default_factory=list)
    """The collectives of the last measured step."""
    dgc_stats: dict[str, Any] | None = None
    """``DGCState.stats`` of the last measured step (DGC methods)."""
    sparse_buckets: list[bool] | None = None
    """``policy="auto"``: the last decision per bucket, True = sparse (None for other methods)."""
    buckets: list[list[str]] = field(default_factory=list)
    """Parameter names per DDP bucket, in the hook's call order (last measured step; empty for
    ``dense``, which has no hook)."""
    note: str = ""
    """Why a figure may be off (e.g. the interface missed RDMA traffic); empty if none."""


_MERGED = ("step_s", "hook_s", "comm_inflight_s", "comm_replay_s", "tx_bytes", "rx_bytes",
           "payload_bytes", "local_step_s", "local_cpu_s", "step_cpu_s")


def merge_ranks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from every rank's: times and bytes averaged over ranks, each rank's kept too.
    ``tx_bytes``/``rx_bytes`` are the node's interface counters, which every rank of a node reads:
    their mean over ranks is the mean over nodes (every node runs as many processes)."""
    merged = dict(rows[0])
    for key in _MERGED:
        if key in merged:
            vals = [float(r[key]) for r in rows]
            merged[key] = statistics.mean(vals)
            merged[f"{key}_ranks"] = vals
    merged.pop("step_s_all", None)
    return merged


def finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None and tuples as lists (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj
