"""An explicit counting wrapper around the transport: a process group that records every collective.

The benchmark runs each method through the classes the training loop uses
(:mod:`dgc.training.communication` and its subclasses), and those talk to the default process
group. So the benchmark makes *that* group a :class:`CountingProcessGroup`: a
``torch.distributed.ProcessGroup`` (PyTorch's extension point for third-party backends,
``Backend.register_backend``) that hands every call to a real gloo or NCCL group and, while
:attr:`CountingProcessGroup.recording` is on, notes what it was asked to move (operation,
element counts, dtype, bytes) and when the work was launched and completed. DDP's own bucketed
allreduce, the hooks' collectives and the ones PowerSGD launches from its future callbacks all
pass through it; nothing in ``torch.distributed`` is replaced.

    init_counting_process_group("gloo", init_method="env://")
    log = counting_group()
    log.recording = True ... log.recording = False; log.records
"""

from __future__ import annotations

import datetime
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "BACKENDS",
    "CollectiveRecord",
    "CountingProcessGroup",
    "counting_group",
    "init_counting_process_group",
]

#: Name of the counting backend for each wrapped backend.
BACKENDS = {"gloo": "countgloo", "nccl": "countnccl"}


@dataclass(kw_only=True, slots=True)
class CollectiveRecord:
    """One collective as the wrapper saw it."""

    op: str
    """``all_reduce``, ``all_gather_single`` (into one tensor), ``all_gather`` (into a list),
    ``all_to_all_single`` (equal splits: the quantized compressors' first phase) or ``broadcast``."""
    in_numel: int
    out_numel: int
    dtype: str
    """Element type without the ``torch.`` prefix, e.g. ``float32``."""
    bytes: int
    """Bytes this rank handed to the collective (its input)."""
    launched_s: float = 0.0
    """``time.perf_counter()`` when it was launched."""
    done_s: float = math.nan
    """``time.perf_counter()`` when its work completed (NaN until then)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields a replay needs (no times): op, in/out elements, dtype, bytes."""
        return {"op": self.op, "in_numel": self.in_numel, "out_numel": self.out_numel,
                "dtype": self.dtype, "bytes": self.bytes}


@dataclass(kw_only=True, slots=True)
class _Log:
    records: list[CollectiveRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class CountingProcessGroup(dist.ProcessGroup):
    """A process group that forwards to ``inner`` and records the collectives (see the module)."""

    def __init__(self, inner: dist.ProcessGroup, rank: int, size: int, inner_backend: str) -> None:
        super().__init__(rank, size)
        self.inner = inner
        self.inner_backend = inner_backend
        """``gloo`` or ``nccl``: the backend that moves the bytes."""
        self.recording = False
        """Record the collectives launched while this is on (on any thread)."""
        self._log = _Log()

    # -- the record ------------------------------------------------------------------------------
    @property
    def records(self) -> list[CollectiveRecord]:
        """What was recorded since the last :meth:`reset`, in launch order."""
        with self._log.lock:
            return list(self._log.records)

    def reset(self) -> None:
        """Forget the records."""
        with self._log.lock:
            self._log.records = []

    def _note(self, op: str, inputs: list[torch.Tensor], out_numel: int, work: Any) -> Any:
        if not self.recording:
            return work
        rec = CollectiveRecord(
            op=op,
            in_numel=sum(t.numel() for t in inputs),
            out_numel=out_numel,
            dtype=str(inputs[0].dtype).removeprefix("torch.") if inputs else "float32",
            bytes=sum(t.numel() * t.element_size() for t in inputs),
            launched_s=time.perf_counter(),
        )
        with self._log.lock:
            self._log.records.append(rec)
        if work is not None:
            work.get_future().add_done_callback(
                lambda _f, rec=rec: setattr(rec, "done_s", time.perf_counter()))
        return work

    # -- the collectives ---------------------------------------------------------------------------
    def getBackendName(self) -> str:  # noqa: N802 (PyTorch's name)
        return BACKENDS[self.inner_backend]

    def allreduce(self, tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        work = self.inner.allreduce(tensors, *args, **kwargs)
        return self._note("all_reduce", tensors, sum(t.numel() for t in tensors), work)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, *args: Any,
                          **kwargs: Any) -> Any:
        gather = getattr(self.inner, "all_gather_single", None) or self.inner._allgather_base
        return self._note("all_gather_single", [input], output.numel(),
                          gather(output, input, *args, **kwargs))

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, *args: Any,
                        **kwargs: Any) -> Any:
        return self.all_gather_single(output, input, *args, **kwargs)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor],
                  *args: Any, **kwargs: Any) -> Any:
        work = self.inner.allgather(outputs, inputs, *args, **kwargs)
        return self._note("all_gather", inputs, sum(t.numel() for o in outputs for t in o), work)

    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int],
                      input_split_sizes: list[int], *args: Any, **kwargs: Any) -> Any:
        """``dist.all_to_all_single``; ``bytes`` is the whole input, of which ``(N-1)/N`` (equal
        splits) leaves the rank."""
        work = self.inner.alltoall_base(output, input, output_split_sizes, input_split_sizes,
                                        *args, **kwargs)
        return self._note("all_to_all_single", [input], output.numel(), work)

    def broadcast(self, tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        work = self.inner.broadcast(tensors, *args, **kwargs)
        return self._note("broadcast", tensors, sum(t.numel() for t in tensors), work)

    def barrier(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.barrier(*args, **kwargs)

    def reduce(self, tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """``dist.reduce`` (hierarchy="node" sums each share onto its owner inside a node's group).
        Passed through, not recorded: the replay models the default group's collectives only."""
        return self.inner.reduce(tensors, *args, **kwargs)


def _gloo(store: Any, rank: int, size: int, timeout: datetime.timedelta) -> CountingProcessGroup:
    inner = dist.ProcessGroupGloo(store, rank, size, timeout)  # honours GLOO_SOCKET_IFNAME
    return CountingProcessGroup(inner, rank, size, "gloo")


def _nccl(store: Any, rank: int, size: int, timeout: datetime.timedelta) -> CountingProcessGroup:
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    inner = dist.ProcessGroupNCCL(store, rank, size, opts)
    return CountingProcessGroup(inner, rank, size, "nccl")


def init_counting_process_group(backend: str, **kwargs: Any) -> CountingProcessGroup:
    """``torch.distributed.init_process_group`` with the default group a
    :class:`CountingProcessGroup` around ``backend`` (``gloo`` or ``nccl``); ``kwargs`` go to
    ``init_process_group`` (``init_method``, ``store``, ``rank``, ``world_size``, ``timeout``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: the counting wrapper supports "
                         f"{' and '.join(BACKENDS)}; pick one of them")
    name = BACKENDS[backend]
    if name not in dist.Backend.backend_list:
        factory = _gloo if backend == "gloo" else _nccl
        dist.Backend.register_backend(name, factory, devices=["cpu" if backend == "gloo" else "cuda"])
    dist.init_process_group(name, **kwargs)
    return counting_group()


def counting_group() -> CountingProcessGroup:
    """The default process group, which :func:`init_counting_process_group` must have made."""
    group = dist.group.WORLD
    if not isinstance(group, CountingProcessGroup):
        raise RuntimeError(
            "the default process group is not a CountingProcessGroup: start it with "
            "dgc.bench.bandwidth.counting.init_counting_process_group(backend, ...) instead of "
            "torch.distributed.init_process_group, so the benchmark can see the collectives"
        )
    return group
