"""A group's communication in flight under Horovod (:mod:`dgc.horovod_optimizer`), from its launch until
``synchronize()`` decodes it into the parameters' gradients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from .codec import Send
from .wire import BucketLayout

if TYPE_CHECKING:
    from .state import DGCState

__all__ = ["Flight"]


@dataclass(kw_only=True, slots=True)
class Flight:
    """A group in flight: the codec's :class:`~dgc.codec.Send`, its Horovod handle, and its parameters
    (one, the small tensors of one dtype concatenated, or a ``hierarchy="node"`` bucket)."""

    send: Send
    handle: int
    params: list[Tensor]
    started: float = 0.0
    """When the collective was launched (``time.perf_counter``), for ``policy="auto"``."""
    encode_s: float = 0.0
    group: BucketLayout | None = None
    """Where the parameters sit in the buffer when the send covers one node share of it
    (``hierarchy="node"``); None: ``send.layout``."""
    decoder: Callable[[Tensor], str | None] | None = None
    """Decodes what arrived into the buffer when the codec's own decode does not apply (a node bucket's
    gathered share messages); returns None or who sent a non-finite gradient."""

    @property
    def kind(self) -> str:
        return "allgather" if self.send.sparse else "allreduce"

    def decode(self, state: DGCState, received: Tensor) -> str | None:
        """The group's average into ``send.buffer``; None, or who sent a non-finite gradient."""
        if self.decoder is not None:
            return self.decoder(received)
        return state.codec.decode(self.send, received)

    def scatter_back(self) -> None:
        """Copy the group's average from the codec's buffer into the parameters' gradients."""
        buffer = self.send.buffer
        layout = self.group if self.group is not None else self.send.layout
        for p, off, numel in zip(self.params, layout.offsets, layout.numels, strict=True):
            if p.grad.data_ptr() != buffer.data_ptr() + off * buffer.element_size():
                p.grad.copy_(buffer[off : off + numel].view_as(p.grad))
