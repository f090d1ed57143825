"""Gradient accumulation over *synchronized* micro-batches, with the DDP hook.

With ``no_sync()`` DDP calls the hook once per optimizer step and nothing here is needed.  Without it,
DDP communicates after every micro-batch, and the bucket of the second micro-batch holds ``p.grad``,
that is, what the hook returned for the first one *plus* the new local gradient.  Plain DDP gets the
right sum that way; DGC would feed its own answer through momentum and residual again (it diverged).

So the DDP session notices a bucket coming back with no optimizer step in between (it hooks the user's
optimizer, see :mod:`dgc.ddp_session`) and replays the window: it rolls u, v and the step back to where
the window started, rebuilds the local gradient accumulated so far (what it held before + what arrived
since its last answer), and compresses that once.  The update that reaches ``optimizer.step()`` is DGC of
the accumulated gradient, and dense warm-up steps count optimizer steps, not micro-batches.  Replaying
needs a copy of u, v, the input and the answer of each bucket: taken in the first optimizer step of a
run, and in every step once accumulation was seen.  Accumulation that starts later, or before DGC knows
the optimizer, is refused with an error naming ``no_sync()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .state import DGCState

__all__ = ["MicroBatches"]


@dataclass(kw_only=True, slots=True)
class _Copy:
    """One tensor's copies in the current optimizer-step window (per tensor, not per bucket: DDP
    rebuilds its buckets after the first micro-batch)."""

    step: int
    momentum: Tensor | None
    residual: Tensor
    input: Tensor | None = None
    """The local gradient accumulated in this window so far (before compression)."""
    answer: Tensor | None = None
    """What the hook returned for it (the average)."""


def _slices(state: DGCState, names: tuple[str, ...], buffer: Tensor) -> list[tuple[str, Tensor]]:
    out, off = [], 0
    for name in names:
        n = state.memory[name].numel
        out.append((name, buffer[off : off + n]))
        off += n
    return out


@dataclass(kw_only=True)
class MicroBatches:
    """Which tensors were sent in the current optimizer-step window, and their copies."""

    window: int = 0
    """Optimizer steps seen so far."""
    optimizer_known: bool = False
    accumulating: bool = False
    _seen: dict[str, int] = field(default_factory=dict)
    _copies: dict[str, _Copy] = field(default_factory=dict)

    def optimizer_stepped(self) -> None:
        """The user's optimizer is about to apply the step: a new window starts."""
        self.window += 1
        self._copies.clear()

    def forget(self) -> None:
        """A failed step: the next call starts afresh (it is not a micro-batch of this one)."""
        self._seen.clear()
        self._copies.clear()

    def before_encode(self, state: DGCState, names: tuple[str, ...], buffer: Tensor) -> None:
        """Called with the bucket's local gradients, before the codec touches state or buffer."""
        repeat = any(self._seen.get(n) == self.window for n in names)
        for n in names:
            self._seen[n] = self.window
        if not (repeat or self.window == 0 or self.accumulating or self._copies):
            return  # nothing to replay or copy: skip the per-tensor views (the common step)
        parts = _slices(state, names, buffer)
        if repeat:
            self._replay(state, parts)
        elif self.window == 0 or self.accumulating:
            for name, _ in parts:
                mem = state.memory[name]
                self._copies[name] = _Copy(
                    step=state.step,
                    momentum=None if mem.momentum is None else mem.momentum.clone(),
                    residual=mem.residual.clone(),
                )
        for name, g in parts:
            copy = self._copies.get(name)
            if copy is not None:
                copy.input = g.clone()

    def after_decode(self, state: DGCState, names: tuple[str, ...], buffer: Tensor) -> None:
        """Called with the bucket's average (the hook's answer)."""
        if not self._copies:
            return
        for name, avg in _slices(state, names, buffer):
            copy = self._copies.get(name)
            if copy is not None:
                copy.answer = avg.clone()

    def _replay(self, state: DGCState, parts: list[tuple[str, Tensor]]) -> None:
        copies = [self._copies.get(name) for name, _ in parts]
        if not self.optimizer_known or any(c is None or c.answer is None for c in copies):
            raise RuntimeError(
                "DGC: the DDP hook ran twice for the same parameters with no optimizer step in between "
                "(gradient accumulation over synchronized micro-batches)"
                + ("" if self.optimizer_known else " before DGC knew the optimizer")
                + ". Accumulate under `with ddp_model.no_sync():` for every micro-batch but the last "
                "(fewer bytes, too), or register with dgc.register(ddp_model, optimizer, config) and "
                "accumulate from the first step on; a loop without a torch.optim optimizer calls "
                "state.optimizer_stepped() after each update."
            )
        self.accumulating = True
        for (name, g), copy in zip(parts, copies, strict=True):
            # What DDP accumulated on top of our last answer is the new local gradient.
            g.sub_(copy.answer).add_(copy.input)
            mem = state.memory[name]
            mem.residual.copy_(copy.residual)
            if mem.momentum is not None:
                mem.momentum.copy_(copy.momentum)
            state.step = copy.step
