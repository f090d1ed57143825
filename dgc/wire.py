"""The wire format of one bucket: one fixed-size byte message per worker.

Every worker sends exactly ``k_i`` pairs for each compressed tensor i of the bucket (``k_i`` depends
only on the tensor's size and the step's density, so it is the same on every rank) and all of each
dense tensor, so all messages have the same size and one ``all_gather_single`` per bucket suffices, with
no size exchange.  Layout, in bytes (``K = sum k_i``, ``D`` = dense elements, ``w`` = wire value size)::

    int32 indices:  [ int32 flags | int32 positions x K              | wire values x K | wire dense x D | pad to 8 ]
    block16:        [ int32 flags | int32 counts x B | int16 x K | pad to 4 | wire values x K | wire dense x D | pad to 8 ]

Positions are places in the *bucket* buffer (tensor offset + position in the tensor), so a receiver
scatters everybody's pairs without knowing the tensor boundaries.  In the block16 format the bucket is cut
into ``B`` blocks of 65,536 elements; the pairs are sorted by position, ``counts[b]`` says how many fall in
block b, and each pair carries only the low 16 bits of its position (stored as int16: 0..65535 shifted
into -32768..32767).  Lossless, 2 bytes per pair + 4 per block instead of 4 per pair.  ``flags`` bit 0 set
means the sender saw a non-finite local gradient, and the rest of its message is to be ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BLOCK", "FLAG_NONFINITE", "BucketLayout", "MessageView", "index_blocks", "pack_pairs", "unpack_positions"]

FLAG_NONFINITE = 1
BLOCK = 1 << 16
"""Elements per block of the block16 index format."""
_HEADER = 4  # bytes of the int32 flags word
_ALIGN = 8


def _round_up(x: int, to: int) -> int:
    return (x + to - 1) // to * to


def index_blocks(index_format: str, bucket_numel: int, pairs: int) -> int:
    """Blocks of the block16 format for a bucket, or 0 for int32 positions (``index_format`` as in
    :class:`dgc.DGCConfig`: "auto" picks the smaller message)."""
    blocks = max(1, -(-bucket_numel // BLOCK))
    if index_format == "int32" or pairs == 0:
        return 0
    if index_format == "block16":
        return blocks
    return blocks if 4 * blocks + _round_up(2 * pairs, 4) < 4 * pairs else 0


@dataclass(kw_only=True, slots=True, frozen=True)
class BucketLayout:
    """Where each tensor of a bucket lives, in the bucket buffer and in the message."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    """Element offset of each tensor in the bucket buffer."""
    numels: tuple[int, ...]
    ks: tuple[int, ...]
    """Pairs sent per tensor; 0 marks a dense tensor."""
    wire_dtype: torch.dtype
    index_blocks: int = 0
    """0: int32 positions; > 0: the block16 format with this many blocks (see the module docstring)."""
    dense_sizes: tuple[int, ...] = ()
    """Elements each tensor puts in the message's dense region: 0 for a sparse tensor, else its live
    count (a pruned tensor sends only its unpruned entries; see :meth:`dense_positions`).  Empty: every
    dense tensor sends all its elements."""

    @property
    def index_format(self) -> str:
        return "block16" if self.index_blocks else "int32"

    @property
    def index_bytes(self) -> int:
        """Bytes the positions of the K pairs take in a message (counts and padding included)."""
        if self.index_blocks:
            return 4 * self.index_blocks + _round_up(2 * self.pairs, 4)
        return 4 * self.pairs

    @property
    def pairs(self) -> int:
        return sum(self.ks)

    @property
    def dense_numel(self) -> int:
        if self.dense_sizes:
            return sum(self.dense_sizes)
        return sum(n for n, k in zip(self.numels, self.ks, strict=True) if k == 0)

    def dense_size(self, i: int) -> int:
        """Elements tensor ``i`` puts in the dense region."""
        return self.dense_sizes[i] if self.dense_sizes else (self.numels[i] if self.ks[i] == 0 else 0)

    @property
    def compressed(self) -> bool:
        """True when at least one tensor goes sparse (else the bucket is allreduced)."""
        return self.pairs > 0

    @property
    def message_bytes(self) -> int:
        w = torch.empty((), dtype=self.wire_dtype).element_size()
        raw = _HEADER + self.index_bytes + w * (self.pairs + self.dense_numel)
        return _round_up(raw, _ALIGN)

    def dense_positions(self, device: torch.device, masks: tuple[Tensor | None, ...] = ()) -> Tensor:
        """Bucket positions of the dense tensors' elements, in message order (int64); with ``masks``
        (one flat bool tensor or None per tensor), only the live elements of a masked tensor."""
        parts = []
        for i, (o, n, k) in enumerate(zip(self.offsets, self.numels, self.ks, strict=True)):
            if k:
                continue
            mask = masks[i] if masks else None
            if mask is None:
                parts.append(torch.arange(o, o + n, device=device))
            else:
                parts.append(torch.nonzero(mask.to(device)).reshape(-1).add_(o))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=device)


@dataclass(kw_only=True, slots=True)
class MessageView:
    """Typed views into one message, or into N gathered messages (leading dimension N)."""

    flags: Tensor
    counts: Tensor
    """int32 pairs per block (block16 format; empty for int32 positions)."""
    indices: Tensor
    """int32 positions, or the int16 low halves of the positions (block16)."""
    values: Tensor
    dense: Tensor

    @classmethod
    def of(cls, raw: Tensor, layout: BucketLayout, world_size: int | None = None) -> MessageView:
        """Views of ``raw`` (uint8): one message (``world_size`` None) or ``world_size`` messages."""
        n = 1 if world_size is None else world_size
        rows = raw.view(n, layout.message_bytes)
        w = torch.empty((), dtype=layout.wire_dtype).element_size()
        k, d, b = layout.pairs, layout.dense_numel, layout.index_blocks
        c0 = _HEADER
        i0 = c0 + 4 * b
        v0 = _HEADER + layout.index_bytes
        d0 = v0 + w * k
        d1 = d0 + w * d
        view = cls(
            flags=rows[:, :_HEADER].view(torch.int32),
            counts=rows[:, c0:i0].view(torch.int32),
            indices=rows[:, i0 : i0 + (2 if b else 4) * k].view(torch.int16 if b else torch.int32),
            values=rows[:, v0:d0].view(layout.wire_dtype),
            dense=rows[:, d0:d1].view(layout.wire_dtype),
        )
        if world_size is None:
            view.flags, view.counts, view.indices, view.values, view.dense = (
                view.flags[0],
                view.counts[0],
                view.indices[0],
                view.values[0],
                view.dense[0],
            )
        return view


def pack_pairs(layout: BucketLayout, view: MessageView, positions: Tensor, values: Tensor) -> None:
    """Write the K pairs (int32 bucket ``positions``, ``values`` in the wire dtype) into one message
    ``view`` in the layout's index format.  block16 sorts the pairs by position (stable: a receiver
    scatters them in the same order whatever the selection kernel produced)."""
    if not layout.index_blocks:
        if view.indices.data_ptr() != positions.data_ptr():
            view.indices.copy_(positions)
        if view.values.data_ptr() != values.data_ptr():
            view.values.copy_(values)
        return
    pos, order = positions.sort(stable=True)
    torch.index_select(values, 0, order, out=view.values)
    pos = pos.long()
    # Counts from the sorted positions by binary search: no device synchronization (bincount has one).
    ends = torch.searchsorted(pos, torch.arange(1, layout.index_blocks + 1, device=pos.device) << 16)
    view.counts.copy_(torch.diff(ends, prepend=ends.new_zeros(1)))
    low = pos & (BLOCK - 1)
    view.indices.copy_(low - ((low >> 15) << 16))  # 0..65535 -> int16 without overflow


def unpack_positions(layout: BucketLayout, view: MessageView, world_size: int) -> Tensor:
    """The ``(world_size, K)`` int32 bucket positions of gathered messages (``MessageView.of(raw,
    layout, world_size)``)."""
    if not layout.index_blocks:
        return view.indices.reshape(world_size, -1)
    b, k = layout.index_blocks, layout.pairs
    counts = view.counts.reshape(world_size * b).long()
    blocks = torch.arange(b, device=counts.device).repeat(world_size)
    high = torch.repeat_interleave(blocks, counts, output_size=world_size * k) << 16
    low = view.indices.reshape(-1).long() & (BLOCK - 1)
    return (high | low).to(torch.int32).reshape(world_size, k)
