"""Per-bucket timing of whatever hook a method registers, without touching the method.

:class:`HookTimer` stands in for the DDP model when a method attaches itself
(``Communication.attach_ddp``): it forwards everything to the model, except that the hook the
method registers is wrapped to time its synchronous part (compression and launch) and to note
which parameters each bucket holds.
"""

# No `from __future__ import annotations`: DDP inspects the hook's signature at runtime.

import time
from typing import Any

from torch import nn

__all__ = ["HookTimer"]


class HookTimer:
    """A DDP model whose registered comm hook is timed (see the module)."""

    def __init__(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        self._ddp = ddp
        self._names = {id(p): name for name, p in ddp.module.named_parameters()}
        self.active = False
        """Time the hook calls while this is on."""
        self.hook_s = 0.0
        """Seconds inside the hook calls (their synchronous part) since :meth:`reset`."""
        self.buckets: list[list[str]] = []
        """Parameter names per bucket, in the hook's call order, of the last recorded step."""

    @property
    def module(self) -> nn.Module:
        return self._ddp.module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ddp, name)

    def reset(self) -> None:
        self.hook_s = 0.0
        self.buckets = []

    def register_comm_hook(self, state: object, hook: Any) -> None:
        timer = self

        def timed_hook(state, bucket):  # DDP checks the parameter is named `bucket`
            if not timer.active:
                return hook(state, bucket)
            timer.buckets.append([timer._names.get(id(p), "?") for p in bucket.parameters()])
            t0 = time.perf_counter()
            fut = hook(state, bucket)
            timer.hook_s += time.perf_counter() - t0
            return fut

        self._ddp.register_comm_hook(state, timed_hook)
