"""The DGC codec: what one worker puts on the wire for a group of tensors, and what it makes of everybody's.

Transport-neutral.  A *group* is a flat gradient buffer holding several parameters back to back (a DDP
bucket, or Horovod's concatenated small tensors, or one Horovod tensor); its :class:`~dgc.wire.BucketLayout`
says where each tensor lives and how many pairs it sends.  The transports (:mod:`dgc.ddp_hook`,
:mod:`dgc.horovod`) only move what :meth:`Codec.encode` produced with their framework's collectives
and hand the result to :meth:`Codec.decode`:

    encode   finiteness flag; every tensor through :mod:`dgc.compressor` (weight decay, clipping, momentum
             correction, accumulation; selection into the message for sparse tensors); pruned
             coordinates left out; the message packed in the layout's index and value formats;
             the traffic counted (:meth:`Codec.count`, the one place that does);
    (transport: ``all_gather`` of the messages, or ``all_reduce`` of the dense payload)
    decode   everybody's flags; scatter-add of everybody's pairs and the dense part, divided by N, into
             the group's buffer (a sparse group), or the reduced payload back into the buffer (dense).

A :class:`Send` then settles through the step's :class:`~dgc.ledger.StepLedger`: :meth:`Send.commit`
(clear the delivered dense payloads from the residuals) when the whole step arrived, :meth:`Send.undo`
(put this worker's sent pairs back) when any group of the step failed.  See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .compressor import dense_scale
from .wire import (
    FLAG_NONFINITE,
    BucketLayout,
    MessageView,
    dequantize_int8,
    index_blocks,
    pack_pairs,
    unpack_positions,
    wire_values,
)

if TYPE_CHECKING:
    from .state import DGCState

__all__ = ["MAX_INDEX", "Codec", "Send", "SentPart"]

MAX_INDEX = 2**31 - 1
"""Positions travel as int32: no tensor or group may hold more elements."""


@dataclass(kw_only=True, slots=True)
class SentPart:
    """What one tensor contributed to a step: its pairs (``positions`` in the group, the tensor starting
    at ``offset``), or, ``positions`` None, its whole dense payload (all of v, or its live entries)."""

    name: str
    positions: Tensor | None
    offset: int
    values: Tensor


@dataclass(kw_only=True)
class Send:
    """One group's contribution to a step, from :meth:`Codec.encode` until the step is settled."""

    layout: BucketLayout
    buffer: Tensor
    """The group's flat gradient buffer; :meth:`Codec.decode` writes the average into it."""
    finite: bool
    """This worker's local gradients were finite (else nothing entered its state)."""
    message: Tensor | None = None
    """Sparse group: this worker's message (uint8)."""
    payload: Tensor | None = None
    """Dense group: what the allreduce carries (the buffer, or a pruned group's live entries)."""
    live: Tensor | None = None
    """Dense group with pruned tensors: the buffer positions of the payload."""
    positions: Tensor | None = None
    """Sparse group: this worker's selected pairs, bucket positions (int32) and values as sent (the wire
    dtype's, or, int8, the dequantized float32 values), in selection order."""
    values: Tensor | None = None
    parts: list[SentPart] = field(default_factory=list)
    """Per tensor, what was sent (to give back what reached no parameter; see the DDP session)."""
    direct: tuple[bool, ...] = ()
    """Dense group: per tensor, whether its payload took the direct path (v untouched; see
    :meth:`dgc.state.DGCState.compress_dense_in_place`)."""

    @property
    def sparse(self) -> bool:
        """The group travels as messages (all-gather), not as a payload (all-reduce)."""
        return self.message is not None

    def commit(self, state: DGCState) -> None:
        """The step arrived everywhere: delivered dense payloads leave only their rounding error in v
        (sent pairs were cleared at encoding)."""
        if not self.finite:
            return
        sent_dtype = self.layout.wire_dtype if self.sparse else self.buffer.dtype
        direct = self.direct or (False,) * len(self.layout.names)
        for name, k, d in zip(self.layout.names, self.layout.ks, direct, strict=True):
            if k == 0 and not d:
                state.finish_dense(name, sent_dtype, True)

    def undo(self, state: DGCState) -> None:
        """The step failed somewhere: put this worker's sent pairs back (dense payloads never left v, but
        those of the direct path never entered it)."""
        if not self.finite:
            return
        if not self.sparse:
            for name, d in zip(self.layout.names, self.direct, strict=False):
                if d:
                    state.undo_dense_direct(name)
            return
        pair = 0
        for name, off, k in zip(self.layout.names, self.layout.offsets, self.layout.ks, strict=True):
            if k:
                idx = self.positions[pair : pair + k].long() - off
                state.restore(name, idx, self.values[pair : pair + k])
                pair += k


class Codec:
    """Encoding and decoding of groups for one :class:`~dgc.state.DGCState`, with its caches (layouts,
    reusable message buffers, dense positions), which are rebuilt when masks or the state change."""

    def __init__(self, state: DGCState) -> None:
        self.state = state
        self._layouts: dict[tuple[object, ...], BucketLayout] = {}
        self._workspace: dict[tuple[object, ...], dict[str, Tensor]] = {}
        self._dense_positions: dict[tuple[object, ...], Tensor] = {}

    def invalidate(self) -> None:
        """Forget every cache (masks, density or device changed)."""
        self._layouts.clear()
        self._workspace.clear()
        self._dense_positions.clear()

    # ------------------------------------------------------------------ layouts
    def layout(
        self,
        names: tuple[str, ...],
        *,
        sparse: bool | None = None,
        offsets: tuple[int, ...] | None = None,
        span: int | None = None,
    ) -> BucketLayout:
        """The wire layout of the group ``names`` at the current step (cached per step phase, density and
        decision).  ``sparse``: force the policy's decision (None: ``state.policy`` decides).  ``offsets``
        and ``span``: the tensors' places in a larger buffer of ``span`` elements (a shard of a bucket);
        default: back to back."""
        state = self.state
        if sparse is None:
            sparse = state.policy.sparse(names)
        key = (names, state.step >= state.config.dense_steps, state.density, sparse, offsets, span)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = self._new_layout(names, sparse, offsets, span)
        return layout

    def _new_layout(
        self, names: tuple[str, ...], sparse: bool, offsets: tuple[int, ...] | None, span: int | None
    ) -> BucketLayout:
        state = self.state
        numels = tuple(state.memory_of(n).numel for n in names)
        if offsets is None:
            starts, total = [], 0
            for n in numels:
                starts.append(total)
                total += n
            offsets, span = tuple(starts), total
        if span > MAX_INDEX:
            raise ValueError(
                f"a gradient group holds {span} elements; DGC positions are int32. "
                "Use a smaller DDP bucket_cap_mb."
            )
        ks = tuple(state.k_for(n) if sparse else 0 for n in names)
        # a share of a bucket indexes its own range only: [its first position, its last end)
        base = min(offsets, default=0)
        end = max((o + n for o, n in zip(offsets, numels, strict=True)), default=0)
        return BucketLayout(
            names=names,
            offsets=offsets,
            numels=numels,
            ks=ks,
            wire_dtype=state.config.wire_dtype,
            index_blocks=index_blocks(state.config.index_format, end - base, sum(ks)),
            index_base=base,
            # pruned coordinates never travel, on the dense path either
            dense_sizes=tuple(0 if k else state.memory_of(n).live for n, k in zip(names, ks, strict=True)),
        )

    def groups_at(self, density: float) -> list[tuple[str, ...]]:
        """The groups (tensor names) laid out so far for steps of ``density``, e.g. a DDP step's buckets."""
        return [key[0] for key in self._layouts if key[2] == density]

    def dense_positions(self, layout: BucketLayout, device: torch.device) -> Tensor:
        """Group positions of what the layout's dense tensors send: every element, or the live ones of a
        pruned tensor (cached until the masks change)."""
        key = (layout, device)
        pos = self._dense_positions.get(key)
        if pos is None:
            masks = tuple(self.state.memory_of(n).mask for n in layout.names)
            pos = self._dense_positions[key] = layout.dense_positions(device, masks)
        return pos

    def workspace(self, layout: BucketLayout, device: torch.device) -> dict[str, Tensor]:
        """Reusable buffers of a sparse group: its message and (block16) the pairs before packing.

        Safe to reuse across steps: both transports wait for a group's collective before its next step.
        """
        key = (layout, device)
        ws = self._workspace.get(key)
        if ws is None:
            ws = {"message": torch.zeros(layout.message_bytes, dtype=torch.uint8, device=device)}
            view = MessageView.of(ws["message"], layout)
            if layout.index_blocks:  # pairs are selected here, then sorted and packed into the message
                ws["positions"] = torch.empty(layout.pairs, dtype=torch.int32, device=device)
                ws["values"] = torch.empty(layout.pairs, dtype=layout.wire_dtype, device=device)
            else:  # int32 positions are selected straight into the message
                ws["positions"], ws["values"] = view.indices, view.values
            self._workspace[key] = ws
        return ws

    def scratch(self, layout: BucketLayout, device: torch.device, what: str, size: int, dtype: torch.dtype) -> Tensor:
        """A reusable buffer ``what`` of the group (gathered messages, a float32 accumulator)."""
        ws = self.workspace(layout, device)
        buf = ws.get(what)
        if buf is None or buf.numel() != size or buf.dtype != dtype:
            buf = ws[what] = torch.empty(size, dtype=dtype, device=device)
        return buf

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        layout: BucketLayout,
        buffer: Tensor,
        *,
        track: bool = False,
        message_bytes: int | None = None,
        as_message: bool | None = None,
        divide: int = 1,
        whole: bool = False,
        finite_of: Tensor | None = None,
    ) -> Send:
        """This worker's contribution of the group in ``buffer`` (local gradients, flat; modified in place).

        Sparse groups get a message; dense groups get a payload to be *summed* by the transport, already
        divided by ``divide`` (pass N before a sum, or keep 1 and reduce with an average).  ``track``
        records per tensor what was sent; ``as_message`` forces a message (a share of a sparse bucket
        that holds no sparse tensor); ``whole``: a dense payload is the whole buffer, zeros outside the
        layout's tensors included (a share of a dense bucket, summed over every process).
        ``finite_of``: what the finiteness check reads instead of the whole ``buffer`` (None: the
        buffer): a share of a bucket checks its own entries only, those that it encodes
        (:meth:`dgc.hierarchy.NodeTopology.encode_share`; the others are the owners' to check)."""
        finite = self.state.finite(buffer if finite_of is None else finite_of)
        message = layout.compressed if as_message is None else as_message
        if message:
            send = self._encode_sparse(layout, buffer, finite)
        else:  # tracked payloads are noted before the division (what v gives back is undivided)
            send = self._encode_dense(layout, buffer, finite, 1 if track else divide, whole)
        if track and finite:
            self._note_parts(send)
        if not message and (track or not finite) and divide != 1:
            send.payload.div_(divide)
        self.count(send, message_bytes)
        return send

    def _encode_dense(self, layout: BucketLayout, buffer: Tensor, finite: bool, divide: int, whole: bool) -> Send:
        direct: tuple[bool, ...] = ()
        if finite:
            direct = self.state.compress_dense_group(
                [(name, buffer[off : off + numel])
                 for name, off, numel in zip(layout.names, layout.offsets, layout.numels, strict=True)],
                divide,
            )
        partial = not whole and layout.dense_numel < buffer.numel()
        live = self.dense_positions(layout, buffer.device) if partial else None
        payload = buffer if live is None else buffer.index_select(0, live)
        if not finite and payload.numel():
            payload.view(-1)[0] = float("nan")  # the sentinel every receiver checks (see decode)
        return Send(layout=layout, buffer=buffer, finite=finite, payload=payload, live=live, direct=direct)

    def _encode_sparse(self, layout: BucketLayout, buffer: Tensor, finite: bool) -> Send:
        ws = self.workspace(layout, buffer.device)
        mine = MessageView.of(ws["message"], layout)
        mine.flags.fill_(0 if finite else FLAG_NONFINITE)
        positions, values = ws["positions"], ws["values"]
        # int8: the kernels select into float32 ("sent": afterwards what the receivers add), the codes
        # go into ``values`` and each tensor's scale into the message.
        sent = self.scratch(layout, buffer.device, "sent", layout.pairs, torch.float32) if layout.quantized else values
        if finite:
            pair, dense = 0, 0
            for i, (name, off, numel, k) in enumerate(
                zip(layout.names, layout.offsets, layout.numels, layout.ks, strict=True)
            ):
                g = buffer[off : off + numel]
                if k:
                    idx = positions[pair : pair + k]
                    c = self.state.compress(name, g, out_indices=idx, out_values=sent[pair : pair + k])
                    if layout.quantized:
                        values[pair : pair + k].copy_(c.values)
                        mine.scales[i] = c.scale
                    idx.add_(off)  # positions in the group, so receivers need no tensor boundaries
                    pair += k
                else:
                    size = layout.dense_size(i)  # a pruned tensor: its live entries only
                    self.state.compress_dense(name, g, out=mine.dense[dense : dense + size])
                    if layout.quantized:
                        mine.scales[i] = dense_scale(self.state.memory_of(name))
                    dense += size
            pack_pairs(layout, mine, positions, values)
        else:  # the others ignore this message; keep its size so nothing else changes
            ws["message"][4:].zero_()
        return Send(layout=layout, buffer=buffer, finite=finite, message=ws["message"],
                    positions=positions, values=sent)

    def _note_parts(self, send: Send) -> None:
        self._note_tensor_parts(send)
        send.parts = [self._as_parameter(part) for part in send.parts]

    def _as_parameter(self, part: SentPart) -> SentPart:
        """A piece's part as a part of its parameter (what the transport gives back is per parameter):
        positions that, less ``offset``, are the parameter's elements."""
        piece = self.state.piece_of(part.name)
        if piece is None:
            return part
        if part.positions is not None:
            return SentPart(name=piece.parent, positions=part.positions, offset=part.offset - piece.start,
                            values=part.values)
        mem = self.state.memory_of(part.name)  # a dense payload: all of the piece, or its live entries
        if part.values.numel() == mem.numel:
            local = torch.arange(mem.numel, device=part.values.device)
        else:
            local = torch.nonzero(mem.mask).reshape(-1).to(part.values.device)
        return SentPart(name=piece.parent, positions=local.add_(piece.start), offset=0, values=part.values)

    def _note_tensor_parts(self, send: Send) -> None:
        layout = send.layout
        if not send.sparse:  # the allreduce overwrites the payload: keep a copy
            kept = send.buffer.clone()
            send.parts = [SentPart(name=n, positions=None, offset=0, values=kept[o : o + s])
                          for n, o, s in zip(layout.names, layout.offsets, layout.numels, strict=True)]
            return
        mine = MessageView.of(send.message, layout)
        pair, dense = 0, 0
        for i, (name, off, k) in enumerate(zip(layout.names, layout.offsets, layout.ks, strict=True)):
            if k:
                send.parts.append(SentPart(name=name, positions=send.positions[pair : pair + k],
                                           offset=off, values=send.values[pair : pair + k]))
                pair += k
            else:
                size = layout.dense_size(i)
                payload = mine.dense[dense : dense + size]
                if layout.quantized:  # what the receivers add: the codes times the tensor's scale
                    payload = dequantize_int8(payload, mine.scales[i])
                send.parts.append(SentPart(name=name, positions=None, offset=0, values=payload))
                dense += size

    def count(self, send: Send, message_bytes: int | None = None) -> None:
        """Add the group's traffic to the step's statistics: the one place that counts bytes
        (``message_bytes``: the size the transport really sends, when it pads the message)."""
        layout, buf, n = send.layout, send.buffer, self.state.world_size
        if send.sparse:
            width = message_bytes or layout.message_bytes
            sent, received = width, n * width
            elements_sent = layout.pairs + layout.dense_numel
        else:
            sent = received = send.payload.numel() * send.payload.element_size()
            elements_sent = send.payload.numel()
        self.state.record(sparse=send.sparse, sent=sent, received=received,
                          dense=buf.numel() * buf.element_size(), elements=buf.numel(),
                          elements_sent=elements_sent)

    # ------------------------------------------------------------------ decode
    def decode(self, send: Send, received: Tensor) -> str | None:
        """Write the group's average into ``send.buffer``; ``received``: the N gathered messages (sparse)
        or the summed payload (dense).  Returns None, or who sent a non-finite gradient."""
        if send.sparse:
            return self._decode_sparse(send, received)
        # A worker whose gradient was not finite put NaN into element 0 of its payload: the sum's element 0
        # tells everyone, without a pass over the bucket (a sum that overflows elsewhere goes unnoticed).
        flat = received.reshape(-1)
        if self.state.config.check_finite and flat.numel() and not torch.isfinite(flat[0]):
            return "a worker"
        buffer = send.buffer
        if send.live is not None:
            buffer.zero_().index_copy_(0, send.live, received)
        elif received.data_ptr() != buffer.data_ptr():
            buffer.copy_(received)
        return None

    def _decode_sparse(self, send: Send, gathered: Tensor) -> str | None:
        layout, buffer = send.layout, send.buffer
        n = gathered.numel() // layout.message_bytes
        everyone = MessageView.of(gathered, layout, n)
        bad = torch.nonzero(everyone.flags.reshape(-1) & FLAG_NONFINITE).reshape(-1).tolist()
        if bad:
            return f"rank(s) {bad}"
        if buffer.dtype == torch.float32:
            out = buffer
        else:
            out = self.scratch(layout, buffer.device, "accumulator", buffer.numel(), torch.float32)
        kernels = self.state.kernels_for(out)
        values, dense = wire_values(layout, everyone, n)  # int8: dequantized with each tensor's scale
        kernels.scatter_unpack(out, unpack_positions(layout, everyone, n), values, n)
        if layout.dense_numel:
            dense_sum = dense.float().sum(dim=0).div_(n)
            out.index_copy_(0, self.dense_positions(layout, buffer.device), dense_sum)
        if out is not buffer:
            buffer.copy_(out)
        return None
