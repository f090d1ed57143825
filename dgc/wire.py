"""The wire format of one bucket: one fixed-size byte message per worker.

Every worker sends exactly ``k_i`` pairs for each compressed tensor i of the bucket (``k_i`` depends
only on the tensor's size and the step's density, so it is the same on every rank) and all of each
dense tensor, so all messages have the same size and one ``all_gather_single`` per bucket suffices, with
no size exchange.  Layout, in bytes (``K = sum k_i``, ``D`` = dense elements, ``w`` = wire value size)::

    [ int32 flags | int32 indices x K | wire values x K | wire dense values x D | pad to 8 ]

Indices are positions in the *bucket* buffer (tensor offset + position in the tensor), so a receiver
scatters everybody's pairs without knowing the tensor boundaries.  ``flags`` bit 0 set means the sender
saw a non-finite local gradient, and the rest of its message is to be ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FLAG_NONFINITE", "BucketLayout", "MessageView"]

FLAG_NONFINITE = 1
_HEADER = 4  # bytes of the int32 flags word
_ALIGN = 8


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

    @property
    def pairs(self) -> int:
        return sum(self.ks)

    @property
    def dense_numel(self) -> int:
        return sum(n for n, k in zip(self.numels, self.ks, strict=True) if k == 0)

    @property
    def compressed(self) -> bool:
        """True when at least one tensor goes sparse (else the bucket is allreduced)."""
        return self.pairs > 0

    @property
    def message_bytes(self) -> int:
        w = torch.empty((), dtype=self.wire_dtype).element_size()
        raw = _HEADER + 4 * self.pairs + w * (self.pairs + self.dense_numel)
        return (raw + _ALIGN - 1) // _ALIGN * _ALIGN

    def dense_positions(self, device: torch.device) -> Tensor:
        """Bucket positions of the dense tensors' elements, in message order (int64)."""
        parts = [
            torch.arange(o, o + n, device=device)
            for o, n, k in zip(self.offsets, self.numels, self.ks, strict=True)
            if k == 0
        ]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=device)


@dataclass(kw_only=True, slots=True)
class MessageView:
    """Typed views into one message, or into N gathered messages (leading dimension N)."""

    flags: Tensor
    indices: Tensor
    values: Tensor
    dense: Tensor

    @classmethod
    def of(cls, raw: Tensor, layout: BucketLayout, world_size: int | None = None) -> MessageView:
        """Views of ``raw`` (uint8): one message (``world_size`` None) or ``world_size`` messages."""
        n = 1 if world_size is None else world_size
        rows = raw.view(n, layout.message_bytes)
        w = torch.empty((), dtype=layout.wire_dtype).element_size()
        k, d = layout.pairs, layout.dense_numel
        i0 = _HEADER
        v0 = i0 + 4 * k
        d0 = v0 + w * k
        d1 = d0 + w * d
        view = cls(
            flags=rows[:, :_HEADER].view(torch.int32),
            indices=rows[:, i0:v0].view(torch.int32),
            values=rows[:, v0:d0].view(layout.wire_dtype),
            dense=rows[:, d0:d1].view(layout.wire_dtype),
        )
        if world_size is None:
            view.flags, view.indices, view.values, view.dense = (
                view.flags[0],
                view.indices[0],
                view.values[0],
                view.dense[0],
            )
        return view
