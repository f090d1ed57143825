"""``dense-hook``: DDP's fp32 allreduce issued from PyTorch's Python comm hook.

DDP's built-in allreduce runs in C++; a Python comm hook (DGC's included) adds its call on the
autograd thread per bucket and a Python callback on a gloo thread per bucket, both under the GIL.
This method isolates that cost: the same bytes as ``dense``, through
``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook``.  DGC's dense path
(``dgc-dense``) is then compared with it as well as with ``dense`` (docs/policy.md).
"""

# No `from __future__ import annotations`: DDP inspects the hook's annotations at runtime.

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dgc.training.communication import Allreduce

__all__ = ["PythonAllreduce"]


class PythonAllreduce(Allreduce):
    """:class:`~dgc.training.communication.Allreduce` with PyTorch's Python allreduce hook."""

    name = "dense-hook"

    def attach_ddp(self, ddp_model: nn.parallel.DistributedDataParallel,
                   optimizer: torch.optim.Optimizer) -> None:
        super().attach_ddp(ddp_model, optimizer)  # the byte count: every element, as dense
        ddp_model.register_comm_hook(None, default_hooks.allreduce_hook)  # None: the default group

    def describe(self) -> str:
        return "allreduce from PyTorch's Python comm hook (default_hooks.allreduce_hook)"
