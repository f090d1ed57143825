"""``dist=ddp``: torch.distributed process group and DistributedDataParallel (the default).

Everything comes from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``), so the same command runs on one machine
(``--standalone``) or many (``--nnodes``/``--node_rank``/``--rdzv_endpoint``).  Started without
torchrun, the script runs as a single process (a one-rank group on a free local port).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import socket
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from dgc.training.elastic_store import attempt_store, uses_agent_store

if TYPE_CHECKING:
    from dgc.training.communication import Communication

__all__ = ["DDPRuntime", "DistContext", "Runtime"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class DistContext:
    """Where this process sits."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@runtime_checkable
class Runtime(Protocol):
    """What the training loop needs from a ``dist`` option: :class:`DDPRuntime` (torchrun + DDP) or
    :class:`~dgc.training.horovod_runtime.HorovodRuntime`.

    Every method except :meth:`wrap`'s local work and :meth:`skip_synchronize` is collective: all
    ranks call it, in the same order.
    """

    name: str
    """The option's name (``ddp``, ``horovod``), for logs and for the compress option's checks."""

    def init(self) -> DistContext:
        """Join the other processes; where this process sits."""
        ...

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             comm: Communication) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The model to call and the optimizer to step: rank 0's weights on every rank, gradients
        averaged the way ``comm`` says."""
        ...

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        """Finish the gradient averaging now, before the gradients are read (clipping, loss
        scaling).  DDP: done once ``backward()`` returns; Horovod: the optimizer's allreduces."""
        ...

    def skip_synchronize(self, optimizer: torch.optim.Optimizer) -> AbstractContextManager[Any]:
        """Context for ``optimizer.step()`` after :meth:`synchronize` (no second averaging)."""
        ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; returns ``t``."""
        ...

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        ...

    def barrier(self) -> None:
        """Wait for every rank."""
        ...

    def shutdown(self) -> None:
        """Leave the process group (after the last collective)."""
        ...


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


class DDPRuntime:
    """Process group plus ``DistributedDataParallel``.

    Args:
        backend: "auto" (nccl when CUDA is available, else gloo), "nccl" or "gloo".
        bucket_cap_mb: DDP's gradient bucket size in MiB (PyTorch's default 25).
        gradient_as_bucket_view: gradients alias DDP's buckets (saves a copy).
        broadcast_buffers: DDP broadcasts rank 0's buffers (BatchNorm statistics) every forward
            (``forward_sync_buffers`` in torch >= 2.13).
        find_unused_parameters: let DDP tolerate parameters without gradients (slower).
        static_graph: tell DDP the graph is the same every step.
        timeout_s: collective timeout in seconds.
    """

    name = "ddp"

    def __init__(self, *, backend: str = "auto", bucket_cap_mb: float = 25.0,
                 gradient_as_bucket_view: bool = True, broadcast_buffers: bool = True,
                 find_unused_parameters: bool = False, static_graph: bool = False,
                 timeout_s: float = 1800.0) -> None:
        if backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"dist.backend = {backend!r} is invalid: use auto, nccl or gloo.")
        if bucket_cap_mb <= 0 or timeout_s <= 0:
            raise ValueError("dist.bucket_cap_mb and dist.timeout_s must be > 0.")
        self.backend = backend
        self.ddp_kwargs: dict[str, Any] = dict(
            bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=gradient_as_bucket_view,
            broadcast_buffers=broadcast_buffers, find_unused_parameters=find_unused_parameters,
            static_graph=static_graph)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.ctx: DistContext | None = None

    def init(self) -> DistContext:
        """Start the process group (the first collective step of the run).  Under torchrun's
        agent store, the group's keys are this attempt's own (:mod:`dgc.training.elastic_store`):
        a restarted worker never reads the killed attempt's addresses."""
        backend = self.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("dist.backend=nccl needs CUDA GPUs; use dist.backend=gloo on CPUs.")
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", 0)
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        if backend == "nccl":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if "MASTER_ADDR" not in os.environ:  # plain `python launch/train.py`: one process
            if world != 1:
                raise ValueError("WORLD_SIZE > 1 but MASTER_ADDR is unset: start with torchrun.")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                    world_size=1, timeout=self.timeout)
        else:  # torchrun: its agent's store, under keys of this attempt's own (elastic_store)
            store = None
            if uses_agent_store():
                store = attempt_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                      rank=rank, world_size=world, timeout=self.timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=self.timeout,
                                    device_id=device if backend == "nccl" else None)
        self.ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank,
                               local_world_size=local_world, device=device, backend=backend)
        return self.ctx

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             comm: Communication) -> tuple[nn.Module, torch.optim.Optimizer]:
        """DDP-wrap ``model`` (broadcasting rank 0's weights) and attach ``comm``'s hook."""
        kwargs = {**self.ddp_kwargs, **comm.ddp_kwargs()}
        if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters:
            kwargs["forward_sync_buffers"] = kwargs.pop("broadcast_buffers")  # torch >= 2.13's name
        device_ids = [self.ctx.device] if self.ctx and self.ctx.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)
        comm.attach_ddp(ddp, optimizer)
        return ddp, optimizer

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to do: DDP's buckets are averaged (hook included) when ``backward()`` returns."""

    def skip_synchronize(self, optimizer: torch.optim.Optimizer) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ collectives for the loop
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (the loop's small CPU tensors travel through the
        device when the backend is NCCL)."""
        if self.ctx is not None and t.device != self.ctx.device and self.ctx.backend == "nccl":
            on_device = t.to(self.ctx.device)
            dist.all_reduce(on_device)
            t.copy_(on_device.cpu())
        else:
            dist.all_reduce(t)
        return t

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.ctx is not None and self.ctx.backend == "nccl":
            dist.barrier(device_ids=[self.ctx.device.index])
        else:
            dist.barrier()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
