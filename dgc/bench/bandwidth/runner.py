"""The benchmark worker: every method on the same model, network and run, one after the other.

For each method it wraps a fresh DDP model, attaches the training loop's class for the method,
runs ``warmup`` unmeasured steps, then ``steps`` measured ones, each started by a barrier, and
reports per step the bytes on the interface (kernel counters), the bytes handed to the
collectives (counted by the :class:`~.counting.CountingProcessGroup`), the method's own account
(``step_stats()``), the step and hook times, and the communication replayed alone. The codec
time comes from the same runs on a one-rank group (:func:`measure_codec`, before the real group
starts; the quantized methods do one of the run's N workers' work there, :mod:`.quant_probe`).
See docs/bandwidth.md.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dgc.bench import grad_shapes

from .cost_model import least_wire_bytes
from .counting import counting_group, init_counting_process_group
from .interface import barrier_traffic, default_iface, interface_bytes
from .interleave import run_interleaved
from .layout import NodeLayout
from .methods import METHODS, MethodSpec
from .options import RunOptions
from .replay import replay as replay_ops
from .results import MethodResult, finite, merge_ranks
from .stepping import AttachedMethod, StepRecords, attach, measure_step, sync, synthetic_directions

__all__ = ["measure_codec", "method_result", "run_method", "run_worker", "worker"]

log = logging.getLogger("dgc.bench")


def _wire_note(result: MethodResult, iface: str, n: int) -> str:
    # the collectives' own figure per step (the ops are every measured step's)
    least = least_wire_bytes(result.ops, n) * result.payload_bytes / max(
        sum(op["bytes"] for op in result.ops), 1)
    if iface != "lo" and result.tx_bytes < 0.9 * least:
        return (f"{iface} carried {result.tx_bytes:.0f} B/step, less than the collectives' "
                f"{least:.0f}: the traffic went another way (RDMA, NVLink, another interface)")
    return ""


def run_method(
    spec: MethodSpec,
    opts: RunOptions,
    *,
    steps: int | None = None,
    measure_bytes: bool = True,
    replay: int | None = None,
    device: torch.device | None = None,
    rank: int | None = None,
    direction: list[torch.Tensor] | None = None,
    codec_world_size: int | None = None,
) -> MethodResult:
    """Train ``opts.warmup + steps`` steps of a fresh DDP model with ``spec``'s class on the
    default group (a counting one) and measure the last ``steps``; every rank calls it.
    ``rank`` seeds the batch (default: this rank); ``codec_world_size``: the processes of the run
    whose codec a one-rank group measures (:attr:`MethodContext.codec_world_size`; None: a real run)."""
    steps = opts.steps if steps is None else steps
    replay = opts.replay if replay is None else replay
    device = device or torch.device("cpu")
    n = dist.get_world_size()
    rank = dist.get_rank() if rank is None else rank
    iface = opts.iface or default_iface(counting_group().inner_backend)
    run = attach(spec, opts, device, rank, direction, codec_world_size=codec_world_size)
    for _ in range(max(opts.warmup, spec.warmup)):
        dist.barrier()
        run.step()
    sync(device)
    barrier = barrier_traffic(iface, steps + 1) if measure_bytes else None
    dist.barrier()
    before = interface_bytes(iface) if measure_bytes else None
    measured = StepRecords()
    for _ in range(steps):
        measure_step(run, measured, device)
    dist.barrier()
    result = method_result(run, measured, n)
    if barrier is not None and before is not None:
        moved = interface_bytes(iface) - before
        result.rx_bytes = (moved.rx - barrier.rx) / steps
        result.tx_bytes = (moved.tx - barrier.tx) / steps
        result.barrier_tx_bytes = barrier.tx / steps
        result.note = _wire_note(result, iface, n)
    if replay:
        result.comm_replay_s = replay_ops(result.ops, device, replay, opts.replay_budget_s)
    return result


def method_result(run: AttachedMethod, measured: StepRecords, n: int) -> MethodResult:
    """This rank's figures of ``run``'s measured steps (medians of times, means of bytes)."""
    stats = run.comm.step_stats()
    state = run.comm.dgc_state
    return MethodResult(
        method=run.spec.name,
        group_size=n,
        step_s=statistics.median(measured.wall),
        step_cpu_s=statistics.median(measured.cpu),
        step_s_all=measured.wall,
        hook_s=statistics.median(measured.hook),
        comm_inflight_s=statistics.median(measured.inflight),
        payload_bytes=statistics.mean(measured.payload),
        stats_bytes_sent=float(stats.bytes_sent),
        collectives=round(statistics.mean(measured.collectives)),
        ops=[r.to_dict() for r in measured.ops],
        buckets=list(run.timer.buckets),
        dgc_stats=stats.to_dict() if state is not None else None,
        sparse_buckets=_sparse_buckets(state),
    )


def _sparse_buckets(state: Any) -> list[bool] | None:
    """``policy="auto"``: the last decision per bucket (True = sparse); None for other methods."""
    policy = getattr(state, "policy", None)
    if policy is None or policy.mode != "auto":
        return None
    return [bool(v) for v in policy.decisions.values()]


# ------------------------------------------------------------------------------------ the codec
def measure_codec(opts: RunOptions, backend: str, device: torch.device, rank: int,
                  direction: list[torch.Tensor] | None = None, *,
                  world_size: int) -> dict[str, dict[str, float]]:
    """Every method's step on a one-rank group (same model, class and compute, no network):
    ``{method: {"local_step_s", "local_cpu_s"}}``. Runs before the real group starts (the
    training classes use the default group, so this one is the default group for a while);
    every node does it at the same time. ``rank`` seeds the batch, as in the real run;
    ``world_size`` is the real run's process count: the quantized methods, which quantize nothing
    on one worker, do one of ``world_size`` workers' work there (:mod:`.quant_probe`)."""
    init_counting_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        out = {}
        for name in opts.methods:
            loc = run_method(METHODS[name], opts, steps=opts.local_steps, measure_bytes=False,
                             replay=0, device=device, rank=rank, direction=direction,
                             codec_world_size=world_size)
            gc.collect()  # free the model, its DDP buckets and the method's state
            out[name] = {"local_step_s": loc.step_s, "local_cpu_s": loc.step_cpu_s}
        return out
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ the worker
def _meta(opts: RunOptions, device: torch.device, iface: str, t_start: float,
          load_start: tuple[float, float, float], layout: NodeLayout) -> dict[str, Any]:
    with torch.device("meta"):
        summary = grad_shapes.shape_summary(grad_shapes.build(opts.model))
    return {
        "model": opts.model,
        "model_description": grad_shapes.MODELS[opts.model].description,
        **summary,
        "dense_fp32_bytes": summary["params"] * 4,
        "nodes": dist.get_world_size(),  # ranks: one per node in the bandwidth sweep
        "processes": dist.get_world_size(),
        "node_count": layout.nodes,  # hosts (by host name)
        "procs_per_node": layout.procs_per_node,
        "node_groups": layout.groups,
        "backend": counting_group().inner_backend,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "iface": iface,
        "iface_shared": iface == "lo",
        "compute": opts.compute,
        "options": asdict(opts),
        "torch": torch.__version__,
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t_start,
        "loadavg": load_start,
        "loadavg_end": os.getloadavg(),
        "label": opts.label,
    }


def _add_codec(rows: list[dict[str, Any]]) -> None:
    """codec_s, codec_cpu_s: each method's one-rank step minus dense's (NaN without them)."""
    base = next((r for r in rows if r["method"] == "dense"), None)
    for r in rows:
        for key, local in (("codec_s", "local_step_s"), ("codec_cpu_s", "local_cpu_s")):
            ok = base is not None and local in r and local in base
            r[key] = r[local] - base[local] if ok else math.nan


def run_worker(opts: RunOptions, out: Path | None, *, device: torch.device | None = None,
               codec: dict[str, dict[str, float]] | None = None) -> dict[str, Any] | None:
    """Every method on the default (counting) group, merged with ``codec``'s one-rank figures;
    rank 0 returns the results and writes them to ``out``, the other ranks return None."""
    opts.check()
    device = device or torch.device("cpu")
    rank, n = dist.get_rank(), dist.get_world_size()
    iface = opts.iface or default_iface(counting_group().inner_backend)
    interface_bytes(iface)  # fail now, not after the first method, if it does not exist
    layout = NodeLayout.of_run()  # checks that torchrun's LOCAL_WORLD_SIZE matches the hosts
    direction = synthetic_directions(opts, rank, device)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    rows: list[dict[str, Any]] = []
    if opts.interleave:
        results = run_interleaved([METHODS[m] for m in opts.methods], opts, device=device,
                                  direction=direction, result=method_result)
    else:
        results = (_one(METHODS[m], opts, device, direction) for m in opts.methods)
    for res in results:
        row = asdict(res)
        row.update((codec or {}).get(res.method, {}))
        gathered: list[Any] = [None] * n
        dist.all_gather_object(gathered, row)
        if rank == 0:
            rows.append(merge_ranks(gathered))
            r = rows[-1]
            log.info("[bench] %-14s step %8.1f ms  comm(replay) %8.1f ms  tx %9.3f MB/step  "
                     "payload %9.3f MB", res.method, r["step_s"] * 1e3, r["comm_replay_s"] * 1e3,
                     r["tx_bytes"] / 1e6, r["payload_bytes"] / 1e6)
    if rank != 0:
        return None
    _add_codec(rows)
    result = {"meta": _meta(opts, device, iface, t_start, load_start, layout), "methods": rows}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(finite(result), indent=1))
    return result


def _one(spec: MethodSpec, opts: RunOptions, device: torch.device,
         direction: list[torch.Tensor] | None) -> MethodResult:
    result = run_method(spec, opts, device=device, direction=direction)
    gc.collect()  # free the model, its DDP buckets and the method's state before the next one
    return result


def _device(backend: str) -> torch.device:
    if backend != "nccl":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def worker(opts: RunOptions, backend: str, out: Path | None, timeout_s: float) -> dict[str, Any] | None:
    """The whole worker under torchrun (``env://``): the one-rank codec runs, then every method
    on the real group; rank 0 returns (and writes) the results."""
    opts.check()
    device = _device(backend)
    rank, n = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    direction = synthetic_directions(opts, rank, device)
    codec = (measure_codec(opts, backend, device, rank, direction, world_size=n)
             if opts.local_steps else None)
    init_counting_process_group(backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = run_worker(opts, out, device=device, codec=codec)
        dist.barrier()  # rank 0 wrote the results: no rank tears gloo down under a peer
        return result
    finally:
        dist.destroy_process_group()
