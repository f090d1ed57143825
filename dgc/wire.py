"""The wire format of one bucket: one fixed-size byte message per worker.

Every worker sends exactly ``k_i`` pairs for each compressed tensor i of the bucket (``k_i`` depends
only on the tensor's size and the step's density, so it is the same on every rank) and all of each
dense tensor, so all messages have the same size and one ``all_gather_single`` per bucket suffices, with
no size exchange.  Layout, in bytes (``K = sum k_i``, ``D`` = dense elements, ``T`` = tensors of the
bucket, ``w`` = wire value size, ``n`` = bucket elements)::

    [ int32 flags | index | float32 scales x T (int8 only) | wire values x K | wire dense x D | pad to 8 ]

    index, int32:    int32 positions x K
    index, block16:  int32 counts x B | int16 x K | pad to 4
    index, bitmap:   1 bit per bucket element (n bits, LSB first) | pad to 4

Positions are places in the *bucket* buffer (tensor offset + position in the tensor), so a receiver
scatters everybody's pairs without knowing the tensor boundaries.

* int32: the pairs in the selection's order.
* block16: the bucket is cut into ``B`` blocks of 65,536 elements; the pairs are sorted by position,
  ``counts[b]`` says how many fall in block b, and each pair carries only the low 16 bits of its
  position (stored as int16: 0..65535 shifted into -32768..32767).  2 bytes per pair + 4 per block.
* bitmap: bit p is set when position p is sent; the values follow in ascending position.  ``n/8``
  bytes whatever K: smaller than block16 above a density of about 1/16 (the first stages of the
  warm-up).  A message still has exactly K set bits, so its size is fixed.

All three are lossless; ``index_format="auto"`` takes the smallest (a tie keeps the earlier of int32,
block16, bitmap).

Values: float32, float16 or bfloat16 as they are, or **int8** with one float32 scale per tensor of the
bucket: a value travels as ``q = round(x / s)`` in [-127, 127], ``s = max|x| / 127`` over what the tensor
sends this step (its selected values, or its whole dense payload), and means ``q * s``
(:func:`quantize_int8`, :func:`dequantize_int8`).  Symmetric, zero point 0: zero is exact (a zero tensor
sends zeros with ``s = 0``), the sum over ranks of ``q * s`` needs no offset correction, and gradients
have no sign bias worth a zero point.  Round to nearest (ties to even) is deterministic, so the sender
knows exactly what the receivers add, and keeps the difference in its residual.  One scale per tensor,
not per chunk: a tensor's selected values are its largest, within a small factor of one another.

``flags`` bit 0 set means the sender saw a non-finite local gradient, and the rest of its message is to
be ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BITMAP",
    "BLOCK",
    "FLAG_NONFINITE",
    "INT8_LEVELS",
    "BucketLayout",
    "MessageView",
    "dequantize_int8",
    "index_blocks",
    "int8_scale",
    "pack_pairs",
    "quantize_int8",
    "unpack_positions",
    "wire_values",
]

FLAG_NONFINITE = 1
BLOCK = 1 << 16
"""Elements per block of the block16 index format."""
BITMAP = -1
"""``BucketLayout.index_blocks`` of the bitmap index format."""
INT8_LEVELS = 127
"""int8 values lie in [-127, 127]: symmetric, so ``-q`` is always a code too."""
_HEADER = 4  # bytes of the int32 flags word
_ALIGN = 8


def _round_up(x: int, to: int) -> int:
    return (x + to - 1) // to * to


def _bitmap_bytes(bucket_numel: int) -> int:
    return _round_up(-(-bucket_numel // 8), 4)


def index_blocks(index_format: str, bucket_numel: int, pairs: int) -> int:
    """The index format of a bucket, as :attr:`BucketLayout.index_blocks`: 0 for int32 positions, the
    number of blocks for block16, :data:`BITMAP` for a bitmap (``index_format`` as in
    :class:`dgc.DGCConfig`: "auto" picks the smallest index; a tie keeps int32, then block16)."""
    blocks = max(1, -(-bucket_numel // BLOCK))
    if index_format == "int32" or pairs == 0:
        return 0
    if index_format == "block16":
        return blocks
    if index_format == "bitmap":
        return BITMAP
    best, size = 0, 4 * pairs
    block16 = 4 * blocks + _round_up(2 * pairs, 4)
    if block16 < size:
        best, size = blocks, block16
    if _bitmap_bytes(bucket_numel) < size:
        best = BITMAP
    return best


@dataclass(kw_only=True, slots=True, frozen=True)
class BucketLayout:
    """Where each tensor of a bucket lives, in the bucket buffer and in the message."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    """Element offset of each tensor in the bucket buffer (tensors back to back, in this order)."""
    numels: tuple[int, ...]
    ks: tuple[int, ...]
    """Pairs sent per tensor; 0 marks a dense tensor."""
    wire_dtype: torch.dtype
    """Dtype of the values in the message: a float dtype, or ``torch.int8`` (one float32 scale per
    tensor, see the module docstring)."""
    index_blocks: int = 0
    """0: int32 positions; > 0: the block16 format with this many blocks; :data:`BITMAP`: a bitmap
    (see the module docstring)."""
    index_base: int = 0
    """The first position a block16 or bitmap index addresses: positions travel as ``position -
    index_base``, so a share of a larger bucket (``hierarchy="node"``: a contiguous range starting here)
    pays for the blocks or bits of its own range only.  0 for a whole bucket.  Not on the wire: sender and
    receivers derive it from the same layout.  int32 positions stay absolute."""
    dense_sizes: tuple[int, ...] = ()
    """Elements each tensor puts in the message's dense region: 0 for a sparse tensor, else its live
    count (a pruned tensor sends only its unpruned entries; see :meth:`dense_positions`).  Empty: every
    dense tensor sends all its elements."""

    @property
    def index_format(self) -> str:
        if self.index_blocks == BITMAP:
            return "bitmap"
        return "block16" if self.index_blocks else "int32"

    @property
    def bucket_numel(self) -> int:
        """Elements a position may address: up to the end of the last tensor (a bitmap's bits)."""
        return max((o + n for o, n in zip(self.offsets, self.numels, strict=True)), default=0)

    @property
    def index_bytes(self) -> int:
        """Bytes the positions of the K pairs take in a message (counts and padding included)."""
        if self.index_blocks == BITMAP:
            return _bitmap_bytes(self.bucket_numel - self.index_base)
        if self.index_blocks:
            return 4 * self.index_blocks + _round_up(2 * self.pairs, 4)
        return 4 * self.pairs

    @property
    def quantized(self) -> bool:
        """Values travel as int8 codes with one float32 scale per tensor."""
        return self.wire_dtype == torch.int8

    @property
    def scale_count(self) -> int:
        """float32 scales in a message: one per tensor (int8 values), else none."""
        return len(self.names) if self.quantized else 0

    @property
    def value_size(self) -> int:
        """Bytes of one value on the wire."""
        return torch.empty((), dtype=self.wire_dtype).element_size()

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
        raw = _HEADER + self.index_bytes + 4 * self.scale_count + self.value_size * (self.pairs + self.dense_numel)
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
    """int32 pairs per block (block16 format; empty otherwise)."""
    indices: Tensor
    """int32 positions, the int16 low halves of the positions (block16), or the bitmap's bytes (uint8)."""
    scales: Tensor
    """float32 scale of each tensor (int8 values; empty otherwise)."""
    values: Tensor
    dense: Tensor

    @classmethod
    def of(cls, raw: Tensor, layout: BucketLayout, world_size: int | None = None) -> MessageView:
        """Views of ``raw`` (uint8): one message (``world_size`` None) or ``world_size`` messages."""
        n = 1 if world_size is None else world_size
        rows = raw.view(n, layout.message_bytes)
        w = layout.value_size
        k, d, b = layout.pairs, layout.dense_numel, max(layout.index_blocks, 0)
        c0 = _HEADER
        i0 = c0 + 4 * b
        s0 = _HEADER + layout.index_bytes
        v0 = s0 + 4 * layout.scale_count
        d0 = v0 + w * k
        d1 = d0 + w * d
        if layout.index_blocks == BITMAP:
            indices = rows[:, i0:s0]
        elif b:
            indices = rows[:, i0 : i0 + 2 * k].view(torch.int16)
        else:
            indices = rows[:, i0 : i0 + 4 * k].view(torch.int32)
        view = cls(
            flags=rows[:, :_HEADER].view(torch.int32),
            counts=rows[:, c0:i0].view(torch.int32),
            indices=indices,
            scales=rows[:, s0:v0].view(torch.float32),
            values=rows[:, v0:d0].view(layout.wire_dtype),
            dense=rows[:, d0:d1].view(layout.wire_dtype),
        )
        if world_size is None:
            view.flags, view.counts, view.indices, view.scales, view.values, view.dense = (
                view.flags[0],
                view.counts[0],
                view.indices[0],
                view.scales[0],
                view.values[0],
                view.dense[0],
            )
        return view


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_pairs(layout: BucketLayout, view: MessageView, positions: Tensor, values: Tensor) -> None:
    """Write the K pairs (int32 bucket ``positions``, ``values`` in the wire dtype) into one message
    ``view`` in the layout's index format.  block16 and bitmap sort the pairs by position (stable: a
    receiver scatters them in the same order whatever the selection kernel produced)."""
    if not layout.index_blocks:
        if view.indices.data_ptr() != positions.data_ptr():
            view.indices.copy_(positions)
        if view.values.data_ptr() != values.data_ptr():
            view.values.copy_(values)
        return
    pos, order = positions.sort(stable=True)
    torch.index_select(values, 0, order, out=view.values)
    pos = pos.long() - layout.index_base if layout.index_base else pos.long()
    if layout.index_blocks == BITMAP:
        bits = torch.zeros(8 * view.indices.numel(), dtype=torch.uint8, device=pos.device)
        bits[pos] = 1
        weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=pos.device)
        view.indices.copy_((bits.view(-1, 8) * weights).sum(dim=1))  # < 256: no overflow
        return
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
    k = layout.pairs
    if layout.index_blocks == BITMAP:
        shifts = torch.arange(8, dtype=torch.uint8, device=view.indices.device)
        bits = (view.indices.reshape(world_size, -1, 1) >> shifts) & 1
        # Exactly K bits per message: a fixed output size, so no device synchronization.
        where = torch.nonzero_static(bits.reshape(world_size, -1), size=world_size * k)
        return (where[:, 1] + layout.index_base).to(torch.int32).reshape(world_size, k)
    b = layout.index_blocks
    counts = view.counts.reshape(world_size * b).long()
    blocks = torch.arange(b, device=counts.device).repeat(world_size)
    high = torch.repeat_interleave(blocks, counts, output_size=world_size * k) << 16
    low = view.indices.reshape(-1).long() & (BLOCK - 1)
    return ((high | low) + layout.index_base).to(torch.int32).reshape(world_size, k)


# ---------------------------------------------------------------------------------- int8 values
def int8_scale(x: Tensor) -> Tensor:
    """The scale of ``x`` on an int8 wire: ``max|x| / 127`` (float32, 0-dim, on ``x``'s device); 0 for an
    empty or all-zero ``x``, never NaN for a finite one."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.detach().abs().amax().float() / INT8_LEVELS


def quantize_int8(x: Tensor, scale: Tensor) -> Tensor:
    """int8 codes of ``x``: ``round(x / scale)`` (to nearest, ties to even) clamped to [-127, 127];
    all zeros when ``scale`` is 0 (then ``x`` is zero)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x.float() / safe).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)


def dequantize_int8(codes: Tensor, scale: Tensor) -> Tensor:
    """What int8 ``codes`` with ``scale`` (broadcast) mean, in float32: the sender and every receiver
    compute exactly this product."""
    return codes.float() * scale


def wire_values(layout: BucketLayout, view: MessageView, world_size: int) -> tuple[Tensor, Tensor]:
    """The ``(world_size, K)`` pair values and ``(world_size, D)`` dense values of gathered messages,
    as sent: the wire dtype's values themselves, or, int8, the dequantized float32 values."""
    values = view.values.reshape(world_size, -1)
    dense = view.dense.reshape(world_size, -1)
    if not layout.quantized:
        return values, dense
    scales = view.scales.reshape(world_size, -1)
    device = scales.device
    # Pairs come tensor by tensor: in the layout's order (int32), or by position (sorted formats).
    order = list(range(len(layout.names)))
    if layout.index_blocks:
        order.sort(key=layout.offsets.__getitem__)
    ks = torch.tensor([layout.ks[i] for i in order], device=device)
    pair_scales = torch.repeat_interleave(scales[:, order], ks, dim=1, output_size=layout.pairs)
    sizes = torch.tensor([layout.dense_size(i) for i in range(len(layout.names))], device=device)
    dense_scales = torch.repeat_interleave(scales, sizes, dim=1, output_size=layout.dense_numel)
    return dequantize_int8(values, pair_scales), dequantize_int8(dense, dense_scales)
