"""The intra-node stage of ``hierarchy="node"`` through shared memory, for CPU tensors.

Over gloo, the processes of one node talk through TCP loopback: a reduce per share of a 100 MB step
costs far more than the copy and the sum it stands for.  Processes of one node share memory, so here
the node's processes exchange the entries through one ``/dev/shm`` segment instead:

    1. each process copies into its slot the entries of the *other* ranks' shares (its own share it
       keeps in place in its buffer);
    2. one barrier inside the node (a tiny gloo collective on the node's process group);
    3. each owner adds the other ranks' slot entries of its share into its buffer (its own entries
       first, then the others in local-rank order: the same bits every run), and divides by the node
       size.

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

**Two halves, one barrier.**  The segment has two halves, used by alternate calls, so a call needs no
barrier after its reads.  Rank r writes half h at call c and next at call c + 2.  Before that write, r
has passed the barrier of call c + 1, which every rank of the node entered only after returning from
call c, i.e. after its reads of half h.  The writes of call c + 1 go to the other half, which nobody
reads during call c.  So no write overtakes a read, and every read follows the barrier that follows
the writes it reads.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["SHM_DIR", "NodeShm", "NodeShmUnavailable", "Share", "folds", "reduce_reference"]

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
"""Where the segments live (a tmpfs on Linux)."""
PREFIX = "dgc-node-"
"""The segments' file names start with this (then a random token)."""
_ALIGN = 64
_GROW = 1 << 20  # halves grow in MiB


class NodeShmUnavailable(RuntimeError):
    """Shared memory cannot serve this node (members on other hosts, ``/dev/shm`` missing or full, a
    member that cannot open the segment); raised on every rank of the node alike."""


class Share(Protocol):
    """A local rank's share of a bucket: ranges of bucket positions (a :class:`dgc.wire.BucketLayout`)."""

    @property
    def offsets(self) -> tuple[int, ...]: ...

    @property
    def numels(self) -> tuple[int, ...]: ...


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
    """Calls so far: the half a call uses is ``calls % 2``."""
    fold: bool = True
    """Fold the division by the node size into the copies and the first addition where that is exact
    (:func:`folds`); False: always sum, then divide (the same bits where folding is exact; a
    benchmark's "before")."""
    paths: list[str] = field(default_factory=list)
    """The files of the segments made so far (each unlinked once every process had mapped it)."""
    _segment: Tensor | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ setup
    @classmethod
    def open(cls, group: dist.ProcessGroup | None, root: int, local_rank: int, local_size: int) -> NodeShm:
        """Check that every member of the node runs on this host and can map a segment (a small one;
        :meth:`reduce` grows it).  Raises :class:`NodeShmUnavailable` on every rank otherwise."""
        hosts: list[object] = [None] * local_size
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        if len(set(hosts)) > 1:
            raise NodeShmUnavailable(f"the node's processes run on different hosts {hosts} (by local rank)")
        shm = cls(group=group, root=root, local_rank=local_rank, local_size=local_size)
        shm._map_new(_GROW // 16)
        return shm

    def _map_new(self, half_bytes: int) -> None:
        """A new segment of two halves of ``half_bytes`` (collective; unlinked before it returns)."""
        size = 2 * half_bytes
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
        ok = torch.tensor([0 if failed else 1], dtype=torch.int32)
        try:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)  # every rank has mapped it (or failed)
        finally:
            if self.local_rank == 0:
                os.unlink(str(path))
        if not ok.item():
            raise NodeShmUnavailable(f"a process of the node could not map {path}" + (f": {failed}" if failed else ""))
        self._segment, self.half_bytes = segment, half_bytes

    # ------------------------------------------------------------------ the stage
    def reduce(self, shares: Sequence[Share], buffer: Tensor) -> None:
        """Each share's entries of ``buffer`` summed over the node onto its owner (the local rank of the
        same index), who divides them by the node size; ``buffer``'s other entries are left as they are."""
        sizes = [sum(s.numels) for s in shares]
        need = (self.local_size - 1) * sum(sizes) * buffer.element_size()
        if need > self.half_bytes:
            self._map_new(-(-need // _GROW) * _GROW)
        assert self._segment is not None
        start = (self.calls % 2) * self.half_bytes
        self.calls += 1
        half = self._segment[start : start + need].view(buffer.dtype)
        me = self.local_rank
        scale = 1 / self.local_size if self.fold and folds(buffer.dtype, self.local_size) else None
        for j, share in enumerate(shares):  # 1. the others' shares into my slot (scaled: folded)
            if j != me and sizes[j]:
                _pack(share, buffer, half[self._place(sizes, me, j) :], scale)
        dist.barrier(group=self.group)  # 2. every slot written
        if sizes[me]:  # 3. my share: mine + the others', in local-rank order
            slots = [half[self._place(sizes, r, me) :] for r in range(self.local_size) if r != me]
            if scale is None:
                _sum_share(shares[me], buffer, slots, self.local_size)
            else:
                _sum_scaled_share(shares[me], buffer, slots, scale)

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
