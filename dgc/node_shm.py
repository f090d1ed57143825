"""The intra-node stage of ``hierarchy="node"`` through shared memory, for CPU tensors.

Over gloo, the processes of one node talk through TCP loopback: a reduce per share of a 100 MB step
costs far more than the copy and the sum it stands for.  Processes of one node share memory, so here
the node's processes exchange the entries through one ``/dev/shm`` segment instead:

    1. :meth:`NodeShm.post`: each process copies into its slot the entries of the *other* ranks'
       shares (its own share it keeps in place in its buffer) and publishes a counter: "call c posted";
    2. :meth:`NodeShm.complete`: once every process of the node has posted call c (read from their
       counters, no collective), each owner adds the other ranks' slot entries of its share into its
       buffer (its own entries first, then the others in local-rank order: the same bits every run),
       divides by the node size and publishes "call c read".

:meth:`NodeShm.reduce` is both at once.  Apart, a process posts a bucket and goes on with its backward
pass; it sums that bucket at a later hook call, when the others have posted it too, instead of waiting
for them (the DDP hook's pipelined stage: docs/policy.md).  Completions come in call order.

The entries of the other shares in an owner's buffer are left as they were (:meth:`NodeShm.reduce`
only reads them).  Sums: a float32 (or float64) buffer is summed in its own dtype, in place; a narrower
buffer (bfloat16, float16) is summed and divided in float32, then rounded once to its dtype.

**The division, folded.**  For a float32 (or float64) buffer and a node size L that is a power of two,
the division by L costs no pass of its own: senders write ``x * (1/L)`` into their slots (the same
bytes as the copy) and the owner computes ``own * (1/L) + slot`` in one ``torch.add(slot, own,
alpha=1/L, out=own)``, then adds the other slots.  Scaling by a power of two is exact, so every partial
sum is the unscaled one times 1/L and the result has the bits of ``(sum) / L``, except where a scaled
value falls into the subnormal range (below 1.2e-38 in float32: it loses low bits there) or where the
unscaled sum overflows (past 3.4e38: the folded sum stays finite where sum-then-divide gives inf).
Gradients of a trained model are nowhere near either end.  For other node sizes 1/L is not exact: the
owner sums, then divides (:attr:`NodeShm.fold`, :func:`folds`).

**The segment.**  Local rank 0 creates a file under ``/dev/shm`` with a random name (``O_EXCL``),
reserves its pages (``posix_fallocate``: a full ``/dev/shm`` fails here, not with a SIGBUS later) and
broadcasts the name inside the node; every process maps it, the node agrees that all did, and local
rank 0 unlinks the file at once: the memory lives as long as a mapping does, and a crash leaves
nothing in ``/dev/shm``.  A bucket larger than the segment makes a new one the same way (all ranks of a
node see the same buckets, so they grow at the same call).

**Two halves, two counters per process.**  The segment starts with a header of counters, one cache
line each: ``posted[r]`` (calls process r has posted) and ``read[r]`` (calls whose reads it has
completed).  Then come two halves, used by alternate calls.  Before posting call c into half c % 2, a
process waits until every process has read call c - 2 (``read[r] >= c - 1``), the previous call in that
half; before reading call c, until every process has posted it (``posted[r] >= c + 1``).  Counters are
stored with release and loaded with acquire order (:func:`dgc.kernels.cpu_fused.counter_store`), so
whoever sees a counter sees the writes before it.  A process waits by polling; every second it checks
that the processes it waits for are alive, and raises naming them if one has died (instead of hanging
until the process group's timeout).  Without ordered counters (neither the compiled kernels nor an
x86 CPU) shared memory is not used.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from .kernels import cpu_fused

__all__ = ["SHM_DIR", "NodeShm", "NodeShmUnavailable", "Posted", "Share", "folds", "reduce_reference"]

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
"""Where the segments live (a tmpfs on Linux)."""
PREFIX = "dgc-node-"
"""The segments' file names start with this (then a random token)."""
_ALIGN = 64
_GROW = 1 << 20  # halves grow in MiB
_LINE = 8  # int64 counters per cache line: one counter per line
_POLL_FAST = 200  # polls that only yield the CPU before the short sleeps
_POLL_SLEEP_S = 1e-4
_ALIVE_EVERY_S = 1.0


class NodeShmUnavailable(RuntimeError):
    """Shared memory cannot serve this node (members on other hosts, ``/dev/shm`` missing or full, a
    member that cannot open the segment); raised on every rank of the node alike."""


class Share(Protocol):
    """A local rank's share of a bucket: ranges of bucket positions (a :class:`dgc.wire.BucketLayout`)."""

    @property
    def offsets(self) -> tuple[int, ...]: ...

    @property
    def numels(self) -> tuple[int, ...]: ...


@dataclass(kw_only=True, eq=False)
class Posted:
    """One call of the stage, posted by this process and not yet completed: where its entries are."""

    call: int
    shares: Sequence[Share]
    buffer: Tensor
    sizes: list[int]
    scale: float | None
    """1 / node size where the division is folded (:func:`folds`), else None."""
    counters: Tensor = field(repr=False)
    """The int64 header of the segment the call went into (a later call may have grown a new one)."""
    half: Tensor = field(repr=False)
    """The call's half of that segment, as the buffer's dtype."""


@dataclass(kw_only=True)
class NodeShm:
    """One node's shared segment, as mapped by this process.  Every method is collective inside the
    node (all its processes call it at the same point, with the same shares)."""

    group: dist.ProcessGroup | None
    """The node's process group (gloo)."""
    root: int
    """Global rank of the node's local rank 0 (it creates the segments)."""
    local_rank: int
    local_size: int
    half_bytes: int = 0
    """Bytes of each of the two halves of the segment."""
    calls: int = 0
    """Calls posted so far: call c uses half ``c % 2``."""
    done: int = 0
    """Calls completed so far (in order; ``calls - done`` are posted, not yet completed)."""
    pids: list[int] = field(default_factory=list)
    """Process id of each local rank (to tell a dead one from a slow one while waiting)."""
    timeout_s: float = 1800.0
    """Longest wait for the other processes (gloo's default timeout), then ``RuntimeError``."""
    waits: int = 0
    """Calls whose :meth:`complete` had to wait for another process (none had posted late: 0)."""
    fold: bool = True
    """Fold the division by the node size into the copies and the first addition where that is exact
    (:func:`folds`); False: always sum, then divide (the same bits where folding is exact; a
    benchmark's "before")."""
    paths: list[str] = field(default_factory=list)
    """The files of the segments made so far (each unlinked once every process had mapped it)."""
    _segment: Tensor | None = field(default=None, repr=False)
    _counters: Tensor | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ setup
    @classmethod
    def open(cls, group: dist.ProcessGroup | None, root: int, local_rank: int, local_size: int) -> NodeShm:
        """Check that every member of the node runs on this host and can map a segment (a small one;
        :meth:`reduce` grows it).  Raises :class:`NodeShmUnavailable` on every rank otherwise."""
        if not cpu_fused.counters_ordered():
            raise NodeShmUnavailable("its counters need the compiled CPU kernels (dgc.kernels.cpu_fused) on "
                                     "this CPU; they are unavailable")
        hosts: list[object] = [None] * local_size
        dist.all_gather_object(hosts, (socket.gethostname(), os.getpid()), group=group)
        names = [h[0] for h in hosts]  # type: ignore[index]
        if len(set(names)) > 1:
            raise NodeShmUnavailable(f"the node's processes run on different hosts {names} (by local rank)")
        shm = cls(group=group, root=root, local_rank=local_rank, local_size=local_size,
                  pids=[int(h[1]) for h in hosts])  # type: ignore[index]
        shm._map_new(_GROW // 16)
        return shm

    @property
    def header_bytes(self) -> int:
        """Bytes before the halves: ``posted`` and ``read`` counters of every local rank, a line each."""
        return -(-2 * self.local_size * _LINE * 8 // _ALIGN) * _ALIGN

    def _map_new(self, half_bytes: int) -> None:
        """A new segment of two halves of ``half_bytes`` (collective; unlinked before it returns)."""
        if self.done != self.calls:
            raise RuntimeError(f"NodeShm: a new segment with calls {self.done}..{self.calls - 1} not completed")
        size = self.header_bytes + 2 * half_bytes
        path, error = None, ""
        if self.local_rank == 0:
            try:
                path = _create(size)
            except OSError as exc:
                error = (f"cannot create a {size / 1e6:.1f} MB segment in {SHM_DIR} ({exc}); "
                         f"its free space: {_free(SHM_DIR)}")
        told: list[object] = [path, error]
        dist.broadcast_object_list(told, src=self.root, group=self.group)
        path, error = told
        if error:
            raise NodeShmUnavailable(str(error))
        self.paths.append(str(path))
        try:
            segment, failed = _map(str(path), size), ""
        except OSError as exc:
            segment, failed = None, str(exc)
        if segment is not None:  # the new header starts from where this process is
            counters = segment[: self.header_bytes].view(torch.int64)
            cpu_fused.counter_store(counters, self._posted_at(self.local_rank), self.calls)
            cpu_fused.counter_store(counters, self._read_at(self.local_rank), self.done)
        ok = torch.tensor([0 if failed else 1], dtype=torch.int32)
        try:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)  # every rank has mapped it (or failed)
        finally:
            if self.local_rank == 0:
                os.unlink(str(path))
        if not ok.item():
            raise NodeShmUnavailable(f"a process of the node could not map {path}" + (f": {failed}" if failed else ""))
        self._segment, self.half_bytes = segment, half_bytes
        self._counters = segment[: self.header_bytes].view(torch.int64)

    # ------------------------------------------------------------------ the stage
    def reduce(self, shares: Sequence[Share], buffer: Tensor) -> None:
        """Each share's entries of ``buffer`` summed over the node onto its owner (the local rank of the
        same index), who divides them by the node size; ``buffer``'s other entries are left as they are.
        (:meth:`post`, then :meth:`complete`; a larger segment first where the call needs one.)"""
        if not self.fits(shares, buffer):
            self._map_new(-(-self._need(shares, buffer) // _GROW) * _GROW)
        self.complete(self.post(shares, buffer))

    def fits(self, shares: Sequence[Share], buffer: Tensor) -> bool:
        """Whether a call on ``shares`` fits the segment (else :meth:`reduce` grows it; :meth:`post`
        cannot: every earlier call must be completed first)."""
        return self._need(shares, buffer) <= self.half_bytes

    def post(self, shares: Sequence[Share], buffer: Tensor) -> Posted:
        """Step 1: the other ranks' shares of ``buffer`` into this process's slot, then "posted".
        ``buffer`` must stay as it is until :meth:`complete`."""
        if not self.fits(shares, buffer):
            raise ValueError(f"NodeShm.post: {self._need(shares, buffer)} bytes do not fit a half of "
                             f"{self.half_bytes}; call reduce() (it grows the segment)")
        assert self._segment is not None and self._counters is not None
        call, me = self.calls, self.local_rank
        if self.done < call - 1:
            raise RuntimeError(f"NodeShm.post: call {self.done} is not completed; complete it before call {call}")
        sizes = [sum(s.numels) for s in shares]
        start = self.header_bytes + (call % 2) * self.half_bytes
        need = self._need(shares, buffer)
        posted = Posted(call=call, shares=shares, buffer=buffer, sizes=sizes, counters=self._counters,
                        half=self._segment[start : start + need].view(buffer.dtype),
                        scale=1 / self.local_size if self.fold and folds(buffer.dtype, self.local_size) else None)
        self.calls += 1
        self._wait(posted.counters, self._read_at, call - 1, f"finish reading call {call - 2}")  # the half is free
        for j, share in enumerate(shares):  # the others' shares into my slot (scaled: folded)
            if j != me and sizes[j]:
                _pack(share, buffer, posted.half[self._place(sizes, me, j) :], posted.scale)
        cpu_fused.counter_store(posted.counters, self._posted_at(me), call + 1)
        return posted

    def ready(self, posted: Posted) -> bool:
        """Whether every process of the node has posted ``posted``'s call (:meth:`complete` would not wait)."""
        return not self._behind(posted.counters, self._posted_at, posted.call + 1)

    def wait(self, posted: Posted) -> None:
        """Until every process of the node has posted ``posted``'s call (counted in :attr:`waits` if it
        had not yet)."""
        if not self.ready(posted):
            self.waits += 1
            self._wait(posted.counters, self._posted_at, posted.call + 1, f"post call {posted.call}")

    def complete(self, posted: Posted) -> None:
        """Step 2, once every process has posted the call (waits for them): this rank's share of the
        buffer, averaged over the node; then "read".  Calls complete in the order they were posted."""
        if posted.call != self.done:
            raise RuntimeError(f"NodeShm.complete: call {posted.call} before call {self.done}; complete in order")
        self.wait(posted)
        me, sizes = self.local_rank, posted.sizes
        if sizes[me]:  # my share: mine + the others', in local-rank order
            slots = [posted.half[self._place(sizes, r, me) :] for r in range(self.local_size) if r != me]
            if posted.scale is None:
                _sum_share(posted.shares[me], posted.buffer, slots, self.local_size)
            else:
                _sum_scaled_share(posted.shares[me], posted.buffer, slots, posted.scale)
        self.done += 1
        cpu_fused.counter_store(posted.counters, self._read_at(me), posted.call + 1)

    # ------------------------------------------------------------------ counters
    def _posted_at(self, rank: int) -> int:
        return rank * _LINE

    def _read_at(self, rank: int) -> int:
        return (self.local_size + rank) * _LINE

    def _need(self, shares: Sequence[Share], buffer: Tensor) -> int:
        return (self.local_size - 1) * sum(sum(s.numels) for s in shares) * buffer.element_size()

    def _behind(self, counters: Tensor, at: Callable[[int], int], target: int) -> list[int]:
        """The other local ranks whose counter (``at(rank)``) is below ``target``."""
        return [r for r in range(self.local_size)
                if r != self.local_rank and cpu_fused.counter_load(counters, at(r)) < target]

    def _wait(self, counters: Tensor, at: Callable[[int], int], target: int, what: str) -> None:
        """Poll until every other local rank's counter reaches ``target``: a few hundred yields, then short
        sleeps; raises if one of them has died or after :attr:`timeout_s`."""
        late = self._behind(counters, at, target)
        polls, start = 0, time.monotonic()
        check = start + _ALIVE_EVERY_S
        while late:
            polls += 1
            time.sleep(0 if polls < _POLL_FAST else _POLL_SLEEP_S)
            late = self._behind(counters, at, target)
            now = time.monotonic()
            if late and now >= check:
                check = now + _ALIVE_EVERY_S
                dead = [r for r in late if not _alive(self.pids[r])]
                if dead or now - start > self.timeout_s:
                    who = ", ".join(f"local rank {r} (pid {self.pids[r]})" for r in (dead or late))
                    why = "exited" if dead else f"did not within {self.timeout_s:.0f} s"
                    raise RuntimeError(
                        f"DGC hierarchy='node': {who} of this node {why} while local rank {self.local_rank} "
                        f"waited for it to {what} in shared memory. A process of the node failed: see its "
                        "error above (or set DGCConfig.node_reduce='collective', whose collectives time out "
                        "through the process group)."
                    )

    def _place(self, sizes: list[int], sender: int, owner: int) -> int:
        """Where, in a half (elements), ``sender``'s copy of ``owner``'s share starts: senders one after
        another, each with the shares of the other ranks in local-rank order."""
        total = sum(sizes)
        return sender * total - sum(sizes[:sender]) + sum(sizes[:owner]) - (sizes[sender] if sender < owner else 0)


def _create(size: int) -> str:
    """A new file of ``size`` bytes, pages reserved, under :data:`SHM_DIR`, readable by this user only."""
    path = os.path.join(SHM_DIR, PREFIX + secrets.token_hex(8))
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def _map(path: str, size: int) -> Tensor:
    """``path`` mapped shared, as a uint8 tensor of ``size`` bytes (the mapping outlives the file name)."""
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size < size:
            raise OSError(f"{path} holds {os.fstat(fd).st_size} bytes, not {size}")
        mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return torch.frombuffer(mem, dtype=torch.uint8)  # the tensor keeps the mapping alive


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) still runs: its ``/proc`` entry exists and is no zombie
    (unreadable: assumed alive)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True


def _free(path: str) -> str:
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return f"unknown ({exc})"
    return f"{st.f_bavail * st.f_frsize / 1e6:.1f} MB"


def folds(dtype: torch.dtype, size: int) -> bool:
    """Whether the stage folds the division by the node ``size`` into its copies and sums: a float32 or
    float64 buffer (narrower ones are summed in float32) and ``size`` a power of two (1/size exact)."""
    return dtype in (torch.float32, torch.float64) and size > 1 and size & (size - 1) == 0


def _pack(share: Share, buffer: Tensor, out: Tensor, scale: float | None = None) -> None:
    """The share's entries of ``buffer`` (times ``scale``, if given) back to back at the start of ``out``."""
    pos = 0
    for off, numel in zip(share.offsets, share.numels, strict=True):
        if scale is None:
            out[pos : pos + numel].copy_(buffer[off : off + numel])
        else:
            torch.mul(buffer[off : off + numel], scale, out=out[pos : pos + numel])
        pos += numel


def _sum_scaled_share(share: Share, buffer: Tensor, slots: list[Tensor], scale: float) -> None:
    """``buffer``'s share entries times ``scale`` plus each slot's (already scaled), in place: the first
    slot in the same pass as the scaling (see "The division, folded" above)."""
    pos = 0
    for off, numel in zip(share.offsets, share.numels, strict=True):
        part = buffer[off : off + numel]
        torch.add(slots[0][pos : pos + numel], part, alpha=scale, out=part)
        for slot in slots[1:]:
            part.add_(slot[pos : pos + numel])
        pos += numel


def _sum_share(share: Share, buffer: Tensor, slots: list[Tensor], size: int) -> None:
    """``buffer``'s share entries plus each slot's (the share back to back), divided by ``size``."""
    wide = buffer.dtype in (torch.float32, torch.float64)
    pos = 0
    for off, numel in zip(share.offsets, share.numels, strict=True):
        part = buffer[off : off + numel]
        acc = part if wide else part.float()
        for slot in slots:
            acc.add_(slot[pos : pos + numel])
        acc.div_(size)
        if not wide:
            part.copy_(acc)
        pos += numel


def reduce_reference(shares: Sequence[Share], buffers: Sequence[Tensor], owner: int, fold: bool = True) -> Tensor:
    """Pure-torch reference of what :meth:`NodeShm.reduce` leaves in local rank ``owner``'s buffer, given
    every local rank's ``buffers`` (by local rank): the owner's share averaged the same way (its own
    entries first, then the others in local-rank order; float32 work for narrower dtypes), the rest as
    it was; ``fold``: as :attr:`NodeShm.fold`, each entry scaled by 1/L before the sum where
    :func:`folds`)."""
    out = buffers[owner].clone()
    wide, n = out.dtype in (torch.float32, torch.float64), len(buffers)
    folded = fold and folds(out.dtype, n)
    for off, numel in zip(shares[owner].offsets, shares[owner].numels, strict=True):
        part = out[off : off + numel]
        if folded:  # (own / L + slot / L) + ...: exactly (own + slot + ...) / L, see the module doc
            acc = part * (1 / n)
            for r, other in enumerate(buffers):
                if r != owner:
                    acc = acc + other[off : off + numel] * (1 / n)
        else:
            acc = part.clone() if wide else part.float()
            for r, other in enumerate(buffers):
                if r != owner:
                    acc = acc + other[off : off + numel]
            acc = acc / n
        part.copy_(acc)
    return out
