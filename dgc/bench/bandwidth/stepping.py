"""One method attached to a fresh DDP model, and its measured steps.

:func:`attach` wraps a fresh model (identical on every rank) in DDP and attaches the training loop's
class for the method; :func:`measure_step` runs one step started by a barrier and records its wall
and CPU time, the hook's time, the collectives (counted by the
:class:`~.counting.CountingProcessGroup`) and the time they were in flight. The worker
(:mod:`.runner`) measures one method after the other, :mod:`.interleave` all of them in turn.

Compute (``RunOptions.compute``): ``real`` is the model's forward/backward on a small random batch;
``synthetic`` the fixed gradient directions of :class:`~dgc.bench.grad_shapes.SyntheticGradients`;
``sleep`` the same directions plus ``compute_s`` of sleep per step, standing for accelerator time
(a third before the backward, two thirds in the backward, spread over the tensors by size through
tensor hooks, so DDP's buckets become ready one after the other while the CPU stays free).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dgc.bench import grad_shapes
from dgc.training.communication import Communication

from .counting import CollectiveRecord, counting_group
from .hooks import HookTimer
from .methods import MethodContext, MethodSpec, optimizer_config
from .options import RunOptions

__all__ = ["AttachedMethod", "StepRecords", "attach", "directions", "inflight_s", "measure_step",
           "sync", "synthetic_directions"]

FORWARD_SHARE = 1 / 3
"""Share of ``compute_s`` slept before the backward (the forward); the rest is spread over it."""


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
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


def synthetic_directions(opts: RunOptions, rank: int, device: torch.device) -> list[torch.Tensor] | None:
    """The directions shared by every method of a run (None with real compute)."""
    if opts.compute == "real":
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


@dataclass(kw_only=True, slots=True)
class AttachedMethod:
    """A method attached to a fresh DDP model, ready to step."""

    spec: MethodSpec
    comm: Communication
    timer: HookTimer
    step: Callable[[], None]


def attach(spec: MethodSpec, opts: RunOptions, device: torch.device, rank: int,
           direction: list[torch.Tensor] | None, *, codec_world_size: int | None = None) -> AttachedMethod:
    """A fresh model (identical on every rank) in DDP with the method's class attached
    (``codec_world_size``: :attr:`MethodContext.codec_world_size`)."""
    comm = spec.build(MethodContext(backend=counting_group().inner_backend,
                                    powersgd_bucket_cap_mb=opts.powersgd_bucket_cap_mb,
                                    codec_world_size=codec_world_size))
    optim = optimizer_config(opts.lr)
    comm.check(dist_name="ddp", optim=optim)
    total = max(opts.warmup, spec.warmup) + opts.steps
    comm.configure(steps_per_epoch=total, total_steps=total)
    model: nn.Module = grad_shapes.build(opts.model, seed=0).to(device)
    if opts.compute != "real":
        model = grad_shapes.SyntheticGradients(model, direction or directions(model, rank, device))
    if opts.compute == "sleep":
        _sleep_in_backward(model, (1 - FORWARD_SHARE) * opts.compute_s)
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
    return AttachedMethod(spec=spec, comm=comm, timer=timer, step=_step_fn(ddp, opt, opts, device, rank))


def _sleep_in_backward(model: nn.Module, seconds: float) -> None:
    """Each parameter's gradient is held back by its share (by size) of ``seconds``: the backward
    takes that long in all and hands DDP its buckets one after the other."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    if seconds <= 0 or not total:
        return
    for p in params:
        pause = seconds * p.numel() / total

        def hook(grad: torch.Tensor, pause: float = pause) -> torch.Tensor:
            time.sleep(pause)
            return grad

        p.register_hook(hook)


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
        forward_s = FORWARD_SHARE * opts.compute_s if opts.compute == "sleep" else 0.0

        def loss() -> torch.Tensor:
            if forward_s:
                time.sleep(forward_s)
            return ddp(0.5 + float(torch.rand((), generator=scales)))

    def step() -> None:
        loss().backward()
        opt.step()
        opt.zero_grad()

    return step


@dataclass(kw_only=True, slots=True)
class StepRecords:
    """Per measured step: what was timed and counted."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    inflight: list[float] = field(default_factory=list)
    hook: list[float] = field(default_factory=list)
    payload: list[int] = field(default_factory=list)
    collectives: list[int] = field(default_factory=list)
    ops: list[CollectiveRecord] = field(default_factory=list)
    """The collectives of the last step."""


def measure_step(run: AttachedMethod, out: StepRecords, device: torch.device) -> None:
    """One step of ``run``, started by a barrier, appended to ``out``."""
    group = counting_group()
    dist.barrier()
    group.reset()
    run.timer.reset()
    group.recording = run.timer.active = True
    t0, c0 = time.perf_counter(), time.process_time()
    run.step()
    sync(device)
    out.wall.append(time.perf_counter() - t0)
    out.cpu.append(time.process_time() - c0)
    group.recording = run.timer.active = False
    records = group.records
    out.inflight.append(inflight_s(records))
    out.hook.append(run.timer.hook_s)
    out.payload.append(sum(r.bytes for r in records))
    out.collectives.append(len(records))
    out.ops = records
