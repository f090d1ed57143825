"""The benchmark worker: every method on the same model, network and run, one after the other.

For each method it wraps a fresh DDP model, attaches the training loop's class for the method,
runs ``warmup`` unmeasured steps, then ``steps`` measured ones, each started by a barrier, and
reports per step the bytes on the interface (kernel counters), the bytes handed to the
collectives (counted by the :class:`~.counting.CountingProcessGroup`), the method's own account
(``step_stats()``), the step and hook times, and the communication replayed alone. The codec
time comes from the same runs on a one-rank group (:func:`measure_codec`, before the real group
starts). See docs/bandwidth.md.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dgc.bench import grad_shapes
from dgc.training.communication import Communication

from .counting import CollectiveRecord, counting_group, init_counting_process_group
from .hooks import HookTimer
from .interface import barrier_traffic, default_iface, interface_bytes
from .methods import METHODS, MethodContext, MethodSpec, optimizer_config
from .options import RunOptions
from .replay import replay as replay_ops
from .results import MethodResult, finite, merge_ranks

__all__ = ["measure_codec", "run_method", "run_worker", "worker"]

log = logging.getLogger("dgc.bench")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _no_buffer_sync() -> dict[str, bool]:
    """DDP keyword that stops the per-forward broadcast of buffers (BatchNorm statistics would add
    ~0.2 MB per step to every method): ``forward_sync_buffers`` in new torch, else the older name."""
    params = inspect.signature(DDP.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: False}


def directions(model: nn.Module, rank: int, device: torch.device) -> list[torch.Tensor]:
    """Fixed random gradient directions of ``rank`` for the synthetic compute."""
    gen = torch.Generator().manual_seed(12345 + rank)
    return [
        torch.randn(p.shape, generator=gen).to(device) for p in model.parameters() if p.requires_grad
    ]


def _synthetic_directions(opts: RunOptions, rank: int,
                          device: torch.device) -> list[torch.Tensor] | None:
    if opts.compute != "synthetic":
        return None
    with torch.device("meta"):  # shapes only
        shapes = grad_shapes.build(opts.model)
    return directions(shapes, rank, device)


def inflight_s(records: list[CollectiveRecord]) -> float:
    """Length of the union of the records' [launch, completion] intervals."""
    spans = sorted((r.launched_s, r.done_s) for r in records if not math.isnan(r.done_s))
    total, end = 0.0, -math.inf
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


# ------------------------------------------------------------------------------------ one method
@dataclass(kw_only=True, slots=True)
class _Run:
    """A method attached to a fresh DDP model, ready to step."""

    comm: Communication
    timer: HookTimer
    step: Callable[[], None]


def _attach(spec: MethodSpec, opts: RunOptions, device: torch.device, rank: int,
            direction: list[torch.Tensor] | None) -> _Run:
    """A fresh model (identical on every rank) in DDP with the method's class attached."""
    comm = spec.build(MethodContext(backend=counting_group().inner_backend,
                                    powersgd_bucket_cap_mb=opts.powersgd_bucket_cap_mb))
    optim = optimizer_config(opts.lr)
    comm.check(dist_name="ddp", optim=optim)
    total = opts.warmup + opts.steps
    comm.configure(steps_per_epoch=total, total_steps=total)
    model: nn.Module = grad_shapes.build(opts.model, seed=0).to(device)
    if opts.compute == "synthetic":
        model = grad_shapes.SyntheticGradients(model, direction or directions(model, rank, device))
    ddp = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        init_sync=False,  # same seed everywhere: skip the 100 MB broadcast per method
        **{"bucket_cap_mb": opts.bucket_cap_mb, **comm.ddp_kwargs()},
        **_no_buffer_sync(),
    )
    opt = comm.make_optimizer(model.parameters(), optim)
    timer = HookTimer(ddp)
    comm.attach_ddp(timer, opt)  # type: ignore[arg-type]  (a DDP stand-in that times the hook)
    return _Run(comm=comm, timer=timer, step=_step_fn(ddp, opt, opts, device, rank))


def _step_fn(ddp: DDP, opt: torch.optim.Optimizer, opts: RunOptions, device: torch.device,
             rank: int) -> Callable[[], None]:
    if opts.compute == "real":
        x, y = grad_shapes.make_batch(opts.model, opts.batch, side=opts.image_side, seq=opts.seq,
                                      seed=1000 + rank)
        x, y = x.to(device), y.to(device)

        def loss() -> torch.Tensor:
            return grad_shapes.real_loss(ddp, x, y)
    else:  # fixed directions, scaled by a random factor each step
        scales = torch.Generator().manual_seed(rank)

        def loss() -> torch.Tensor:
            return ddp(0.5 + float(torch.rand((), generator=scales)))

    def step() -> None:
        loss().backward()
        opt.step()
        opt.zero_grad()

    return step


@dataclass(kw_only=True, slots=True)
class _Steps:
    """Per measured step: what was timed and counted."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    inflight: list[float] = field(default_factory=list)
    hook: list[float] = field(default_factory=list)
    payload: list[int] = field(default_factory=list)
    collectives: list[int] = field(default_factory=list)
    ops: list[CollectiveRecord] = field(default_factory=list)
    """The collectives of the last step."""


def _measure(run: _Run, steps: int, device: torch.device) -> _Steps:
    group = counting_group()
    out = _Steps()
    for _ in range(steps):
        dist.barrier()
        group.reset()
        run.timer.reset()
        group.recording = run.timer.active = True
        t0, c0 = time.perf_counter(), time.process_time()
        run.step()
        _sync(device)
        out.wall.append(time.perf_counter() - t0)
        out.cpu.append(time.process_time() - c0)
        group.recording = run.timer.active = False
        records = group.records
        out.inflight.append(inflight_s(records))
        out.hook.append(run.timer.hook_s)
        out.payload.append(sum(r.bytes for r in records))
        out.collectives.append(len(records))
        out.ops = records
    return out


def _wire_note(result: MethodResult, iface: str, n: int) -> str:
    gathers = all(op["op"] != "all_reduce" for op in result.ops)
    least = result.payload_bytes * ((n - 1) if gathers else 2 * (n - 1) / n)
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
) -> MethodResult:
    """Train ``opts.warmup + steps`` steps of a fresh DDP model with ``spec``'s class on the
    default group (a counting one) and measure the last ``steps``; every rank calls it.
    ``rank`` seeds the batch (default: this rank)."""
    steps = opts.steps if steps is None else steps
    replay = opts.replay if replay is None else replay
    device = device or torch.device("cpu")
    n = dist.get_world_size()
    rank = dist.get_rank() if rank is None else rank
    iface = opts.iface or default_iface(counting_group().inner_backend)
    run = _attach(spec, opts, device, rank, direction)
    for _ in range(opts.warmup):
        dist.barrier()
        run.step()
    _sync(device)
    barrier = barrier_traffic(iface, steps + 1) if measure_bytes else None
    dist.barrier()
    before = interface_bytes(iface) if measure_bytes else None
    measured = _measure(run, steps, device)
    dist.barrier()
    stats = run.comm.step_stats()
    result = MethodResult(
        method=spec.name,
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
        dgc_stats=stats.to_dict() if run.comm.dgc_state is not None else None,
    )
    if barrier is not None and before is not None:
        moved = interface_bytes(iface) - before
        result.rx_bytes = (moved.rx - barrier.rx) / steps
        result.tx_bytes = (moved.tx - barrier.tx) / steps
        result.barrier_tx_bytes = barrier.tx / steps
        result.note = _wire_note(result, iface, n)
    if replay:
        result.comm_replay_s = replay_ops(result.ops, device, replay, opts.replay_budget_s)
    return result


# ------------------------------------------------------------------------------------ the codec
def measure_codec(opts: RunOptions, backend: str, device: torch.device, rank: int,
                  direction: list[torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Every method's step on a one-rank group (same model, class and compute, no network):
    ``{method: {"local_step_s", "local_cpu_s"}}``. Runs before the real group starts (the
    training classes use the default group, so this one is the default group for a while);
    every node does it at the same time. ``rank`` seeds the batch, as in the real run."""
    init_counting_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        out = {}
        for name in opts.methods:
            loc = run_method(METHODS[name], opts, steps=opts.local_steps, measure_bytes=False,
                             replay=0, device=device, rank=rank, direction=direction)
            gc.collect()  # free the model, its DDP buckets and the method's state
            out[name] = {"local_step_s": loc.step_s, "local_cpu_s": loc.step_cpu_s}
        return out
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ the worker
def _meta(opts: RunOptions, device: torch.device, iface: str, t_start: float,
          load_start: tuple[float, float, float]) -> dict[str, Any]:
    with torch.device("meta"):
        summary = grad_shapes.shape_summary(grad_shapes.build(opts.model))
    return {
        "model": opts.model,
        "model_description": grad_shapes.MODELS[opts.model].description,
        **summary,
        "dense_fp32_bytes": summary["params"] * 4,
        "nodes": dist.get_world_size(),
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
    direction = _synthetic_directions(opts, rank, device)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    rows: list[dict[str, Any]] = []
    for name in opts.methods:
        row = asdict(run_method(METHODS[name], opts, device=device, direction=direction))
        gc.collect()  # free the previous model, its DDP buckets and the method's state
        row.update((codec or {}).get(name, {}))
        gathered: list[Any] = [None] * n
        dist.all_gather_object(gathered, row)
        if rank == 0:
            rows.append(merge_ranks(gathered))
            r = rows[-1]
            log.info("[bench] %-12s step %8.1f ms  comm(replay) %8.1f ms  tx %9.3f MB/step  "
                     "payload %9.3f MB", name, r["step_s"] * 1e3, r["comm_replay_s"] * 1e3,
                     r["tx_bytes"] / 1e6, r["payload_bytes"] / 1e6)
    if rank != 0:
        return None
    _add_codec(rows)
    result = {"meta": _meta(opts, device, iface, t_start, load_start), "methods": rows}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(finite(result), indent=1))
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
    rank = int(os.environ.get("RANK", "0"))
    direction = _synthetic_directions(opts, rank, device)
    codec = measure_codec(opts, backend, device, rank, direction) if opts.local_steps else None
    init_counting_process_group(backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = run_worker(opts, out, device=device, codec=codec)
        dist.barrier()  # rank 0 wrote the results: no rank tears gloo down under a peer
        return result
    finally:
        dist.destroy_process_group()
