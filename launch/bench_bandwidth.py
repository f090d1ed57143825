#!/usr/bin/env python3
"""Bandwidth benchmark: gradient compressors side by side on the same model, network and run.

Two commands (see docs/bandwidth.md):

``worker``  one process per node, started by ``torchrun`` on a real or simulated cluster::

    torchrun --nnodes 4 --node_rank $I --nproc_per_node 1 --master_addr $HOST0 --master_port 29500 \\
        launch/bench_bandwidth.py worker --model resnet50 --out results/run.json

``sweep``   the whole grid on this machine: for each node count and link rate, a simulated cluster
            (``launch/simcluster.py``: network namespaces, ``tc``-shaped links) runs the worker;
            then CSV/JSON and PNG plots (``launch/bandwidth_report.py``)::

    sudo .venv/bin/python launch/bench_bandwidth.py sweep --out results/bandwidth

For every method (dense allreduce, fp16, PowerSGD rank 1 and 4, top-k, DGC, DGC with fp16 values)
the worker wraps a fresh DDP model, runs ``--warmup`` steps (DGC's dense steps, PowerSGD's vanilla
allreduce steps, DDP's bucket rebuild), then ``--steps`` measured steps, each started by a barrier,
and reports per step:

* ``tx_bytes``/``rx_bytes``: bytes the node's interface sent/received, from ``/proc/net/dev`` around
  the measured steps (minus the barriers' own traffic), i.e. measured on the wire, headers included;
* ``payload_bytes``: bytes handed to the collectives (what the hooks send, by their own account);
* ``step_s``: end-to-end step time (forward, backward with the hook and its collectives, optimizer);
* ``comm_replay_s``: communication time, the recorded collectives of one step replayed alone
  (same order, sizes, dtypes, one after another), no compute around them;
* ``comm_inflight_s``: wall time during which at least one of the step's collectives was in flight
  (launch to completion; includes waiting for slower peers);
* ``codec_s``: compression + decompression time, i.e. the method's step time on a one-rank process
  group (same hook and compute, no network) minus the dense method's there; ``codec_cpu_s`` the
  same in CPU time of the process (what a dedicated core would take, whatever else runs).

One process per node; CPU (gloo) or GPU (NCCL, ``--backend auto``).  ``--compute real`` runs the
model's forward/backward on a small random batch; ``synthetic`` writes fixed random gradients
through a one-multiply backward (``grad_shapes.SyntheticGradients``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel as DDP

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(1, str(_HERE.parent))

import grad_shapes  # noqa: E402

import dgc  # noqa: E402

__all__ = [
    "METHODS",
    "MethodResult",
    "MethodSpec",
    "Recorder",
    "RunOptions",
    "interface_bytes",
    "main",
    "run_method",
    "run_worker",
]


# ------------------------------------------------------------------------------------------ methods
@dataclass(kw_only=True, slots=True, frozen=True)
class MethodSpec:
    """One gradient exchange of the benchmark."""

    name: str
    kind: str
    """"allreduce", "fp16", "powersgd" or "dgc"."""
    rank: int = 0
    """PowerSGD's matrix approximation rank."""
    dgc: dict[str, Any] = field(default_factory=dict)
    """DGCConfig fields (density, momentum, value_dtype)."""
    description: str = ""


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(name="dense", kind="allreduce",
                   description="fp32 allreduce (default_hooks.allreduce_hook = DDP's default)"),
        MethodSpec(name="fp16", kind="fp16", description="default_hooks.fp16_compress_hook"),
        MethodSpec(name="powersgd-r1", kind="powersgd", rank=1, description="PowerSGD rank 1"),
        MethodSpec(name="powersgd-r4", kind="powersgd", rank=4, description="PowerSGD rank 4"),
        MethodSpec(name="topk", kind="dgc", dgc={"density": 0.001, "momentum": 0.0},
                   description="top-k 0.1% with error feedback (dgc, momentum 0) + SGD momentum"),
        MethodSpec(name="dgc", kind="dgc", dgc={"density": 0.001, "momentum": 0.9},
                   description="DGC 0.1%, momentum correction, fp32 values"),
        MethodSpec(name="dgc-fp16", kind="dgc",
                   dgc={"density": 0.001, "momentum": 0.9, "value_dtype": "float16"},
                   description="DGC 0.1%, momentum correction, fp16 values"),
    )
}


@dataclass(kw_only=True, slots=True)
class RunOptions:
    """What the worker measures; the CLI's flags (see ``worker --help``)."""

    model: str = "resnet50"
    """A name of ``grad_shapes.MODELS``."""
    methods: tuple[str, ...] = tuple(METHODS)
    """Names of ``METHODS`` to run, in this order."""
    compute: str = "real"
    """"real" (the model's forward/backward on a random batch) or "synthetic" (fixed gradients)."""
    batch: int = 4
    """Samples per rank per step (real compute)."""
    image_side: int = 32
    """Side of the random images (real compute, image models)."""
    seq: int = 8
    """Sequence length (real compute, token models)."""
    warmup: int = 3
    """Unmeasured steps first; must exceed DGC's dense_steps and PowerSGD's start iteration (2)."""
    steps: int = 5
    """Measured steps per method."""
    local_steps: int = 2
    """Measured steps on a one-rank group (for codec_s); 0 = skip."""
    replay: int = 2
    """Least repetitions of the communication replay (the fastest is reported; fast collectives
    are repeated up to 30 times within ``replay_budget_s``); 0 = skip."""
    replay_budget_s: float = 1.0
    """Seconds the replay of one method may take beyond ``replay`` rounds (0 = just those)."""
    bucket_cap_mb: float = 25.0
    """DDP bucket size (DDP's default 25)."""
    powersgd_bucket_cap_mb: float | None = None
    """Bucket size for PowerSGD; None = a single bucket on gloo (SPEC 3), bucket_cap_mb on NCCL."""
    lr: float = 1e-4
    """Learning rate of every method's SGD (small: the random batch is not meant to be learnt)."""
    iface: str | None = None
    """Interface whose counters are read; None = $GLOO_SOCKET_IFNAME / $NCCL_SOCKET_IFNAME, else
    the default route's on a multi-node run, else lo."""
    label: str = ""
    """Free text stored with the results (the sweep puts the link rate here)."""


# ----------------------------------------------------------------------------------- measurement
class Recorder:
    """Times the hook calls and records every collective the hooks launch (op, sizes, in-flight
    interval) by wrapping ``torch.distributed``'s collectives, which the hooks look up at call time."""

    _PATCHED = ("all_reduce", "all_gather_into_tensor", "all_gather_single")

    def __init__(self) -> None:
        self.active = False
        self.hook_s = 0.0
        self.ops: list[dict[str, Any]] = []
        self.intervals: list[list[float]] = []
        self._orig: dict[str, Callable[..., Any]] = {}

    def install(self) -> None:
        for name in self._PATCHED:
            orig = getattr(dist, name, None)
            if orig is None or name in self._orig:
                continue
            self._orig[name] = orig
            setattr(dist, name, self._wrap(name, orig))

    def uninstall(self) -> None:
        for name, orig in self._orig.items():
            setattr(dist, name, orig)
        self._orig.clear()

    def reset(self) -> None:
        self.hook_s = 0.0
        self.ops = []
        self.intervals = []

    def _wrap(self, name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        def collective(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return orig(*args, **kwargs)
            t0 = time.perf_counter()
            work = orig(*args, **kwargs)
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if name == "all_reduce":
                out = inp = tensors[0] if tensors else kwargs["tensor"]
            else:
                out = tensors[0] if tensors else kwargs["output_tensor"]
                inp = tensors[1] if len(tensors) > 1 else kwargs["input_tensor"]
            self.ops.append({
                "op": name,
                "in_numel": inp.numel(),
                "out_numel": out.numel(),
                "dtype": str(inp.dtype).removeprefix("torch."),
                "bytes": inp.numel() * inp.element_size(),
            })
            span = [t0, math.nan]
            self.intervals.append(span)
            if work is not None:
                work.get_future().add_done_callback(
                    lambda _f, span=span: span.__setitem__(1, time.perf_counter()))
            return work

        return collective

    def timed_hook(self, hook: Callable[[Any, dist.GradBucket], torch.futures.Future]):
        """``hook`` with the time of its synchronous part (compression, launch) added to hook_s."""
        recorder = self

        def bench_hook(state, bucket):  # DDP checks the parameter is named `bucket`
            t0 = time.perf_counter()
            fut = hook(state, bucket)
            if recorder.active:
                recorder.hook_s += time.perf_counter() - t0
            return fut

        return bench_hook

    def inflight_s(self) -> float:
        """Length of the union of the recorded collectives' [launch, completion] intervals."""
        spans = sorted((a, b) for a, b in self.intervals if not math.isnan(b))
        total, end = 0.0, -math.inf
        for a, b in spans:
            if b > end:
                total += b - max(a, end)
                end = b
        return total


def interface_bytes(iface: str) -> tuple[int, int]:
    """(received, transmitted) byte counters of ``iface`` in this network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, data = line.partition(":")
        if name.strip() == iface:
            fields = data.split()
            return int(fields[0]), int(fields[8])
    raise ValueError(
        f"interface {iface!r} is not in /proc/net/dev of this network namespace: pass --iface "
        "with the interface the collectives use (ip -br link)"
    )


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
    """Time inside the hook calls (their synchronous part: compression and launch)."""
    comm_inflight_s: float
    """Wall time with at least one of the step's collectives in flight."""
    comm_replay_s: float = math.nan
    """The step's collectives replayed alone, best round (NaN = not replayed)."""
    tx_bytes: float = math.nan
    """Bytes the interface sent per step, barrier traffic subtracted (NaN = not measured)."""
    rx_bytes: float = math.nan
    barrier_tx_bytes: float = math.nan
    """What one step's barrier sent, measured apart and subtracted from tx_bytes."""
    payload_bytes: float = 0.0
    """Bytes this rank handed to the collectives per step."""
    collectives: int = 0
    """Collectives per step."""
    ops: list[dict[str, Any]] = field(default_factory=list)
    """The collectives of the last measured step."""
    dgc_stats: dict[str, Any] | None = None
    """``DGCState.stats`` of the last measured step (DGC methods)."""
    buckets: list[list[str]] = field(default_factory=list)
    """Parameter names per DDP bucket, in the hook's call order (last measured step)."""
    note: str = ""
    """Why a figure may be off (e.g. the interface missed RDMA traffic); empty if none."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _attach(
    spec: MethodSpec,
    ddp: DDP,
    model: nn.Module,
    group: dist.ProcessGroup | None,
    recorder: Recorder,
    opts: RunOptions,
) -> tuple[torch.optim.Optimizer, Any]:
    """Register the method's hook on ``ddp``; returns the optimizer and the hook state."""
    params = model.parameters()
    if spec.kind == "allreduce":
        ddp.register_comm_hook(group, recorder.timed_hook(default_hooks.allreduce_hook))
        return torch.optim.SGD(params, lr=opts.lr, momentum=0.9), None
    if spec.kind == "fp16":
        ddp.register_comm_hook(group, recorder.timed_hook(default_hooks.fp16_compress_hook))
        return torch.optim.SGD(params, lr=opts.lr, momentum=0.9), None
    if spec.kind == "powersgd":
        state = powersgd.PowerSGDState(
            process_group=group,
            matrix_approximation_rank=spec.rank,
            start_powerSGD_iter=2,  # vanilla allreduce for 2 steps (the minimum with error feedback)
            compression_stats_logging_frequency=10**9,
        )
        ddp.register_comm_hook(state, recorder.timed_hook(powersgd.powerSGD_hook))
        return torch.optim.SGD(params, lr=opts.lr, momentum=0.9), state
    if spec.kind == "dgc":
        cfg = dgc.DGCConfig(**spec.dgc, dense_steps=2, log_every=0)
        opt = (
            dgc.DGCSGD(params, lr=opts.lr)
            if cfg.momentum > 0
            else torch.optim.SGD(params, lr=opts.lr, momentum=0.9)
        )
        state = dgc.DGCState(cfg, model.named_parameters(), group)
        dgc.check_optimizer(opt, cfg)
        ddp.register_comm_hook(state, recorder.timed_hook(_bucket_logger(dgc.ddp_comm_hook)))
        return opt, state
    raise ValueError(f"method kind {spec.kind!r} is unknown")


def _bucket_logger(hook: Callable[..., Any]) -> Callable[..., Any]:
    """DGC hook that also notes which parameters each bucket holds (for the byte accounting)."""

    def dgc_hook(state, bucket):
        names = [state.name_of(p) for p in bucket.parameters()]
        if bucket.index() == 0:
            state.bench_buckets = []
        state.bench_buckets.append(names)
        return hook(state, bucket)

    return dgc_hook


def _no_buffer_sync() -> dict[str, bool]:
    """DDP keyword that stops the per-forward broadcast of buffers (BatchNorm statistics would add
    ~0.2 MB per step to every method): ``forward_sync_buffers`` in new torch, else the older name."""
    params = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {
        "broadcast_buffers": False
    }


def _bucket_cap(spec: MethodSpec, opts: RunOptions, backend: str) -> float:
    if spec.kind != "powersgd":
        return opts.bucket_cap_mb
    if opts.powersgd_bucket_cap_mb is not None:
        return opts.powersgd_bucket_cap_mb
    # SPEC 3: PyTorch's PowerSGD hook launches its second allreduce from a Future callback; with
    # several buckets gloo then pairs messages of different buckets ("Received data size doesn't
    # match expected size").  One bucket avoids it; NCCL has no such problem.
    return opts.bucket_cap_mb if backend == "nccl" else 1e6


def run_method(
    spec: MethodSpec,
    opts: RunOptions,
    *,
    group: dist.ProcessGroup | None = None,
    steps: int | None = None,
    measure_bytes: bool = True,
    replay: int | None = None,
    device: torch.device | None = None,
    directions: list[torch.Tensor] | None = None,
) -> MethodResult:
    """Train ``opts.warmup + steps`` steps of a fresh DDP model with ``spec``'s hook on ``group``
    (None = the default group) and measure the last ``steps``; every rank of ``group`` calls it."""
    steps = opts.steps if steps is None else steps
    replay = opts.replay if replay is None else replay
    device = device or torch.device("cpu")
    backend = dist.get_backend(group)
    n = dist.get_world_size(group)
    rank = dist.get_rank()
    iface = opts.iface or _default_iface(backend)

    model = grad_shapes.build(opts.model, seed=0).to(device)  # identical on every rank
    if opts.compute == "synthetic":
        if directions is None:
            directions = _directions(model, rank, device)
        model = grad_shapes.SyntheticGradients(model, directions)
    ddp = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group,
        bucket_cap_mb=_bucket_cap(spec, opts, backend),
        gradient_as_bucket_view=True,
        init_sync=False,  # same seed everywhere: skip the 100 MB broadcast per method
        **_no_buffer_sync(),
    )
    recorder = Recorder()
    recorder.install()
    try:
        opt, state = _attach(spec, ddp, model, group, recorder, opts)
        if opts.compute == "real":
            x, y = grad_shapes.make_batch(opts.model, opts.batch, side=opts.image_side,
                                          seq=opts.seq, seed=1000 + rank)
            x, y = x.to(device), y.to(device)
        scales = torch.Generator().manual_seed(rank)

        def step() -> None:
            if opts.compute == "real":
                loss = grad_shapes.real_loss(ddp, x, y)
            else:  # fixed directions, scaled by a random factor each step
                scale = 0.5 + float(torch.rand((), generator=scales))
                loss = ddp(scale)
            loss.backward()
            opt.step()
            opt.zero_grad()

        for _ in range(opts.warmup):
            dist.barrier(group)
            step()
        _sync(device)
        dist.barrier(group)
        barrier_rx, barrier_tx = _barrier_traffic(iface, group, steps + 1) if measure_bytes else (0, 0)
        dist.barrier(group)
        rx0, tx0 = interface_bytes(iface) if measure_bytes else (0, 0)
        times: list[float] = []
        cpu: list[float] = []
        inflight: list[float] = []
        hook_s: list[float] = []
        payload: list[int] = []
        ncoll: list[int] = []
        for _ in range(steps):
            dist.barrier(group)
            recorder.reset()
            recorder.active = True
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            recorder.active = False
            inflight.append(recorder.inflight_s())
            hook_s.append(recorder.hook_s)
            payload.append(sum(op["bytes"] for op in recorder.ops))
            ncoll.append(len(recorder.ops))
        dist.barrier(group)
        rx1, tx1 = interface_bytes(iface) if measure_bytes else (0, 0)
        result = MethodResult(
            method=spec.name,
            group_size=n,
            step_s=statistics.median(times),
            step_cpu_s=statistics.median(cpu),
            step_s_all=times,
            hook_s=statistics.median(hook_s),
            comm_inflight_s=statistics.median(inflight),
            payload_bytes=statistics.mean(payload),
            collectives=round(statistics.mean(ncoll)),
            ops=list(recorder.ops),
        )
        if measure_bytes:
            result.rx_bytes = (rx1 - rx0 - barrier_rx) / steps
            result.tx_bytes = (tx1 - tx0 - barrier_tx) / steps
            result.barrier_tx_bytes = barrier_tx / steps
            gathers = all(op["op"] != "all_reduce" for op in recorder.ops)
            least = result.payload_bytes * ((n - 1) if gathers else 2 * (n - 1) / n)
            if iface != "lo" and result.tx_bytes < 0.9 * least:
                result.note = (
                    f"{iface} carried {result.tx_bytes:.0f} B/step, less than the collectives' "
                    f"{least:.0f}: the traffic went another way (RDMA, NVLink, another interface)"
                )
        if isinstance(state, dgc.DGCState):
            result.dgc_stats = state.stats.to_dict()
            result.buckets = list(getattr(state, "bench_buckets", []))
        if replay:
            result.comm_replay_s = _replay(recorder.ops, group, device, replay,
                                           opts.replay_budget_s)
    finally:
        recorder.uninstall()
    return result


def _directions(model: nn.Module, rank: int, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(12345 + rank)
    return [
        torch.randn(p.shape, generator=gen).to(device) for p in model.parameters() if p.requires_grad
    ]


def _default_iface(backend: str) -> str:
    """The interface the collectives use: $GLOO_SOCKET_IFNAME / $NCCL_SOCKET_IFNAME when they name
    one (not an exclusion list like ``^docker``), else the default route's on a multi-node run,
    else ``lo``."""
    order = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
    for var in order if backend == "gloo" else order[::-1]:
        value = os.environ.get(var, "").split(",")[0].strip()
        if value and not value.startswith("^"):
            return value.lstrip("=")
    if os.environ.get("LOCAL_WORLD_SIZE", "1") != os.environ.get("WORLD_SIZE", "1"):  # multi-node
        try:
            for line in Path("/proc/net/route").read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 1 and fields[1] == "00000000":
                    return fields[0]
        except OSError:
            pass
    return "lo"


def _barrier_traffic(iface: str, group: dist.ProcessGroup | None, count: int) -> tuple[int, int]:
    """Bytes ``count`` barriers move (the measured steps' own barriers, subtracted from them)."""
    dist.barrier(group)
    rx0, tx0 = interface_bytes(iface)
    for _ in range(count):
        dist.barrier(group)
    rx1, tx1 = interface_bytes(iface)
    return rx1 - rx0, tx1 - tx0


_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _replay(ops: list[dict[str, Any]], group: dist.ProcessGroup | None, device: torch.device,
            repeats: int, budget_s: float = 1.0, max_repeats: int = 30) -> float:
    """Time of the step's collectives alone, one after another (PowerSGD's Q allreduce needs its
    P allreduce's result; for hooks whose buckets overlap this is an upper bound).

    Best of at least ``repeats`` rounds, more for fast ones (as many as fit in ``budget_s``, at
    most ``max_repeats``): other processes on the machine only ever add to the time.  The first
    round warms the transport up and sets the count, agreed by all ranks (a MAX allreduce), since
    every rank must run the same collectives."""
    if not ops:
        return 0.0
    buffers = []
    for op in ops:
        dtype = getattr(torch, op["dtype"])
        buffers.append((
            op["op"],
            torch.zeros(op["in_numel"], dtype=dtype, device=device),
            torch.zeros(op["out_numel"], dtype=dtype, device=device),
        ))

    def round_s() -> float:
        _sync(device)
        dist.barrier(group)
        t0 = time.perf_counter()
        for kind, inp, out in buffers:
            if kind == "all_reduce":
                dist.all_reduce(inp, group=group)
            else:
                _ALL_GATHER(out, inp, group=group)
        _sync(device)
        return time.perf_counter() - t0

    first = torch.tensor([round_s()], dtype=torch.float64, device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MAX, group=group)
    count = min(max_repeats, max(repeats, math.ceil(budget_s / max(float(first), 1e-6))))
    return min(round_s() for _ in range(count))


# ------------------------------------------------------------------------------------------ worker
def run_worker(opts: RunOptions, out: Path | None) -> dict[str, Any] | None:
    """Every method on the default group (and on one-rank groups for codec_s); rank 0 returns and
    writes the merged results, the other ranks return None."""
    for m in opts.methods:
        if m not in METHODS:
            raise ValueError(f"--methods: {m!r} is unknown; choose from {', '.join(METHODS)}")
    if opts.warmup < 3:
        raise ValueError(
            f"--warmup {opts.warmup} must be >= 3: DGC's 2 dense steps and PowerSGD's 2 vanilla "
            "steps are not what is measured, and DDP rebuilds its buckets after step 1"
        )
    if opts.compute not in ("real", "synthetic"):
        raise ValueError(f"--compute {opts.compute!r} must be 'real' or 'synthetic'")
    rank, n = dist.get_rank(), dist.get_world_size()
    backend = dist.get_backend()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    iface = opts.iface or _default_iface(backend)
    interface_bytes(iface)  # fail now, not after the first method, if it does not exist
    local = dist.new_subgroups(group_size=1)[0] if opts.local_steps else None
    spec_m = grad_shapes.MODELS[opts.model]
    directions = None
    if opts.compute == "synthetic":
        with torch.device("meta"):  # shapes only
            shapes = grad_shapes.build(opts.model)
        directions = _directions(shapes, rank, device)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for name in opts.methods:
        spec = METHODS[name]
        res = run_method(spec, opts, device=device, directions=directions)
        gc.collect()  # free the previous model, its DDP buckets and hook state
        row = asdict(res)
        if local is not None:
            loc = run_method(spec, opts, group=local, steps=opts.local_steps, measure_bytes=False,
                             replay=0, device=device, directions=directions)
            gc.collect()
            row["local_step_s"] = loc.step_s
            row["local_cpu_s"] = loc.step_cpu_s
        gathered: list[Any] = [None] * n
        dist.all_gather_object(gathered, row)
        if rank == 0:
            rows.append(_merge_ranks(gathered))
            r = rows[-1]
            print(
                f"[bench] {name:12s} step {r['step_s'] * 1e3:8.1f} ms  comm(replay) "
                f"{r['comm_replay_s'] * 1e3:8.1f} ms  tx {r['tx_bytes'] / 1e6:9.3f} MB/step  "
                f"payload {r['payload_bytes'] / 1e6:9.3f} MB",
                flush=True,
            )
    if rank != 0:
        return None
    base = next((r for r in rows if r["method"] == "dense"), None)
    for r in rows:
        for key, local in (("codec_s", "local_step_s"), ("codec_cpu_s", "local_cpu_s")):
            r[key] = r[local] - base[local] if base is not None and local in r else math.nan
    with torch.device("meta"):
        summary = grad_shapes.shape_summary(grad_shapes.build(opts.model))
    result = {
        "meta": {
            "model": opts.model,
            "model_description": spec_m.description,
            **summary,
            "dense_fp32_bytes": summary["params"] * 4,
            "nodes": n,
            "backend": backend,
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
        },
        "methods": rows,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_finite(result), indent=1))
    return result


def _merge_ranks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from every rank's: times and bytes averaged over ranks, each rank's kept too."""
    merged = dict(rows[0])
    for key in ("step_s", "hook_s", "comm_inflight_s", "comm_replay_s", "tx_bytes", "rx_bytes",
                "payload_bytes", "local_step_s", "local_cpu_s", "step_cpu_s"):
        if key in merged:
            vals = [float(r[key]) for r in rows]
            merged[key] = statistics.mean(vals)
            merged[f"{key}_ranks"] = vals
    merged.pop("step_s_all", None)
    return merged


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None and tuples as lists (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _worker_main(args: argparse.Namespace) -> int:
    opts = RunOptions(
        model=args.model,
        methods=tuple(args.methods.split(",")) if args.methods != "all" else tuple(METHODS),
        compute=args.compute,
        batch=args.batch,
        image_side=args.image_side,
        seq=args.seq,
        warmup=args.warmup,
        steps=args.steps,
        local_steps=args.local_steps,
        replay=args.replay,
        replay_budget_s=args.replay_budget_s,
        bucket_cap_mb=args.bucket_cap_mb,
        powersgd_bucket_cap_mb=args.powersgd_bucket_cap_mb,
        iface=args.iface,
        label=args.label,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    try:
        result = run_worker(opts, Path(args.out) if args.out else None)
        if result is not None and not args.out:
            print(json.dumps(_finite(result), indent=1))
    finally:
        dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------- sweep
def _sweep_main(args: argparse.Namespace) -> int:
    import bandwidth_report

    return bandwidth_report.sweep(args, Path(__file__).resolve())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_bandwidth.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("worker", help="one node's process, under torchrun (env:// rendezvous)")
    _common(w)
    w.add_argument("--out", default="", help="JSON file rank 0 writes (default: print it)")
    w.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="auto = nccl with CUDA, else gloo")
    w.add_argument("--iface", default=None,
                   help="interface whose byte counters are read (default $GLOO_SOCKET_IFNAME, "
                        "$NCCL_SOCKET_IFNAME, else lo)")
    w.add_argument("--label", default="", help="free text stored in the results")
    w.add_argument("--timeout", type=float, default=600, help="collective timeout, s")
    w.set_defaults(func=_worker_main)

    s = sub.add_parser("sweep", help="the grid on simulated clusters here (root), then report")
    _common(s)
    s.add_argument("--out", default="results/bandwidth", help="output folder")
    s.add_argument("--nodes", default="2,4", help="node counts (default 2,4)")
    s.add_argument("--bandwidths", default="1gbit,unlimited,10gbit",
                   help="link rates, run in this order (default 1gbit,unlimited,10gbit)")
    s.add_argument("--delay", default="0", help="one-way delay between nodes, e.g. 0.1ms")
    s.add_argument("--extra", default="lstm@2@1gbit",
                   help="extra runs MODEL@NODES@RATE[,...], synthetic compute, no codec run "
                        "('' = none)")
    s.add_argument("--loopback", action="store_true",
                   help="no namespaces: torchrun --standalone on loopback (bandwidth ignored; "
                        "byte counters of lo are shared by all ranks)")
    s.add_argument("--run-timeout", type=float, default=600, help="seconds per cluster run")
    s.add_argument("--budget-s", type=float, default=1140,
                   help="skip the remaining runs once the next one would end past this many "
                        "seconds (estimated from the slowest earlier run of as many nodes); "
                        "0 = no limit (default 1140)")
    s.add_argument("--check", choices=("fail", "warn", "off"), default="warn",
                   help="link rate check before each run (default warn)")
    s.set_defaults(func=_sweep_main)

    r = sub.add_parser("report", help="CSV/plots again from the JSON of a sweep")
    r.add_argument("--out", default="results/bandwidth")
    r.set_defaults(func=lambda a: __import__("bandwidth_report").report_main(Path(a.out)))
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet50", choices=sorted(grad_shapes.MODELS))
    p.add_argument("--methods", default="all", help=f"comma list of {', '.join(METHODS)}, or all")
    p.add_argument("--compute", default="real", choices=("real", "synthetic"),
                   help="real forward/backward on a small random batch, or synthetic gradients")
    p.add_argument("--batch", type=int, default=4, help="samples per rank (real compute)")
    p.add_argument("--image-side", type=int, default=32, help="image side (real compute)")
    p.add_argument("--seq", type=int, default=8, help="sequence length (real compute, lstm)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per method (>= 3)")
    p.add_argument("--steps", type=int, default=5, help="measured steps per method")
    p.add_argument("--local-steps", type=int, default=2,
                   help="steps on a one-rank group, for the codec time (0 = skip)")
    p.add_argument("--replay", type=int, default=2,
                   help="least communication replays, best reported (0 = skip)")
    p.add_argument("--replay-budget-s", type=float, default=1.0,
                   help="fast collectives are replayed again (up to 30 times) within this time")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size")
    p.add_argument("--powersgd-bucket-cap-mb", type=float, default=None,
                   help="PowerSGD bucket size (default: one bucket on gloo, see SPEC 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
