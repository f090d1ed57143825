"""The two-phase quantized exchange of one flat buffer, as pure functions on tensors.

A bucket of ``n`` elements on ``N`` workers is cut into ``N`` shards of ``m = ceil(n / N)``
elements (the last one zero-padded).  Worker ``i``:

1. quantizes shard ``k`` of its (error-corrected) gradient for every ``k != i`` and sends it to
   worker ``k`` (one ``all_to_all_single`` of fixed-size uint8 messages: no size exchange); its own
   shard never leaves the process, so it is kept exact;
2. as owner of shard ``i``, dequantizes the ``N - 1`` contributions, adds its own exact shard,
   divides by ``N`` and quantizes the average once more (:func:`reduce_shard`);
3. ``all_gather``\\ s the owners' messages; everyone dequantizes all ``N`` shards
   (:func:`decode_gathered`) and so holds the same averaged gradient, bit for bit.

Message layout (``ExchangePlan.message_bytes`` bytes, a multiple of 4): a 4-byte header (byte 0:
1 if the sender's gradient was not finite), then :meth:`dgc.quant.encoded.Encoded.to_bytes`.
Each worker hands ``(N - 1) * B`` bytes to the all-to-all and ``B`` to the all-gather, where
``B ~ m * bits / 8``: about ``n * bits / 8`` bytes in all, and it receives about
``2 * n * bits / 8``, whatever ``N`` (an allgather of whole quantized tensors would receive
``N * n * bits / 8``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .quantizer import BlockQuantizer

__all__ = ["HEADER_BYTES", "ExchangePlan", "Reduced", "Shards", "decode_gathered", "encode_shards",
           "nonfinite_senders", "reduce_shard"]

HEADER_BYTES = 4
"""Bytes before the encoded shard in every message (byte 0: the sender's non-finite flag)."""


@dataclass(frozen=True, slots=True)
class ExchangePlan:
    """Shard and message sizes of a buffer of ``numel`` elements on ``world_size`` workers."""

    numel: int
    world_size: int
    shard: int
    """Elements per shard, ``ceil(numel / world_size)`` (the last shard is zero-padded)."""
    message_bytes: int
    """Bytes of one message (header + scales + codes), the same for every shard and phase."""

    @classmethod
    def of(cls, numel: int, world_size: int, quantizer: BlockQuantizer) -> ExchangePlan:
        shard = max(1, -(-numel // world_size))
        return cls(numel=numel, world_size=world_size, shard=shard,
                   message_bytes=HEADER_BYTES + quantizer.nbytes(shard))

    @property
    def padded(self) -> int:
        """``world_size * shard`` elements: the buffer with its padding."""
        return self.world_size * self.shard

    def span(self, k: int) -> slice:
        """Shard ``k``'s elements in the padded buffer."""
        return slice(k * self.shard, (k + 1) * self.shard)

    def message(self, buf: Tensor, k: int) -> Tensor:
        """Message ``k`` of a buffer of ``world_size`` messages."""
        return buf[k * self.message_bytes : (k + 1) * self.message_bytes]


@dataclass(frozen=True, slots=True)
class Shards:
    """Phase 1 of one worker: its messages to the others and what they will decode."""

    messages: Tensor
    """uint8, ``world_size * message_bytes``: message ``k`` goes to worker ``k`` (own slot unused)."""
    sent: Tensor
    """float32, ``padded`` long: the values the owners will decode (own shard: exact)."""


def encode_shards(plan: ExchangePlan, quantizer: BlockQuantizer, corrected: Tensor, rank: int, *,
                  finite: bool, generator: torch.Generator | None) -> Shards:
    """Quantize every shard of ``corrected`` (float32, ``plan.padded`` long) but ``rank``'s own."""
    messages = torch.zeros(plan.world_size * plan.message_bytes, dtype=torch.uint8,
                           device=corrected.device)
    sent = corrected.clone()
    for k in range(plan.world_size):
        msg = plan.message(messages, k)
        msg[0] = 0 if finite else 1
        if k == rank or not finite:
            continue
        encoded = quantizer.encode(corrected[plan.span(k)], generator=generator)
        encoded.to_bytes(msg[HEADER_BYTES:])
        sent[plan.span(k)] = quantizer.decode(encoded)
    return Shards(messages=messages, sent=sent)


def nonfinite_senders(plan: ExchangePlan, received: Tensor) -> list[int]:
    """Ranks whose phase-1 message carried the non-finite flag (the same list on every rank)."""
    flags = received.view(plan.world_size, plan.message_bytes)[:, 0]
    return torch.nonzero(flags).reshape(-1).tolist()


@dataclass(frozen=True, slots=True)
class Reduced:
    """Phase 2 of the owner of one shard."""

    message: Tensor
    """uint8, ``message_bytes``: the quantized average, for the all-gather."""
    average: Tensor
    """float32, ``shard`` long: the exact average before the second quantization."""
    delivered: Tensor
    """float32: what everybody will decode from ``message``."""


def reduce_shard(plan: ExchangePlan, quantizer: BlockQuantizer, received: Tensor, own: Tensor,
                 rank: int, *, generator: torch.Generator | None) -> Reduced:
    """Average the ``N - 1`` received contributions to shard ``rank`` and ``own`` (exact), then
    quantize the average."""
    total = own.clone()
    for k in range(plan.world_size):
        if k != rank:
            payload = plan.message(received, k)[HEADER_BYTES:]
            total += quantizer.decode(quantizer.from_bytes(payload, plan.shard))
    average = total.div_(plan.world_size)
    encoded = quantizer.encode(average, generator=generator)
    message = torch.zeros(plan.message_bytes, dtype=torch.uint8, device=own.device)
    encoded.to_bytes(message[HEADER_BYTES:])
    return Reduced(message=message, average=average, delivered=quantizer.decode(encoded))


def decode_gathered(plan: ExchangePlan, quantizer: BlockQuantizer, gathered: Tensor) -> Tensor:
    """The averaged buffer (float32, ``plan.numel`` long) from the owners' ``N`` messages."""
    parts = [quantizer.decode(quantizer.from_bytes(plan.message(gathered, k)[HEADER_BYTES:],
                                                   plan.shard))
             for k in range(plan.world_size)]
    return torch.cat(parts)[: plan.numel]
