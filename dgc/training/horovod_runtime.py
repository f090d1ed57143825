"""``dist=horovod``: the same loop under ``horovodrun -np N python launch/train.py dist=horovod``.

Horovod has no DDP wrapper: gradients are averaged by a wrapped optimizer
(``hvd.DistributedOptimizer``, ``dgc.horovod.DistributedOptimizer`` for ``compress=dgc``/``topk``, or
``dgc.quant.horovod.DistributedOptimizer`` for ``compress=int8``/``terngrad``/``qsgd``),
and rank 0's weights and optimizer state are broadcast once before training.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dgc.training.runtime import DistContext

if TYPE_CHECKING:
    from dgc.training.communication import Communication

__all__ = ["HorovodRuntime"]

log = logging.getLogger(__name__)


class HorovodRuntime:
    """Horovod processes (gloo or MPI controller, as ``horovodrun`` chose); a
    :class:`~dgc.training.runtime.Runtime`.

    Args:
        device: "auto" (this process's local GPU when CUDA is available, else CPU), "cpu", "cuda".
    """

    name = "horovod"

    def __init__(self, *, device: str = "auto") -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"dist.device = {device!r} is invalid: use auto, cpu or cuda.")
        try:
            import horovod.torch  # noqa: F401
        except ImportError as e:
            raise ValueError(
                "dist=horovod needs Horovod with PyTorch support: bash launch/install_horovod.sh "
                f"(import failed: {e})"
            ) from e
        self.device = device
        self.ctx: DistContext | None = None

    @property
    def hvd(self) -> Any:
        import horovod.torch as hvd

        return hvd

    def init(self) -> DistContext:
        hvd = self.hvd
        hvd.init(process_sets="dynamic")  # hierarchy=node adds one process set per node
        use_cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        if use_cuda:
            device = torch.device("cuda", hvd.local_rank())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        self.ctx = DistContext(rank=hvd.rank(), world_size=hvd.size(), local_rank=hvd.local_rank(),
                               local_world_size=hvd.local_size(), device=device, backend="horovod")
        return self.ctx

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             comm: Communication) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Broadcast rank 0's weights, then let ``comm`` wrap the optimizer.

        The optimizer state is not broadcast: it is empty at the start, and a resumed run loads
        the same saved state on every rank (``hvd.broadcast_optimizer_state`` would run a
        zero-gradient step, which weight decay turns into an update).
        """
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return model, comm.wrap_horovod(optimizer, model)

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        """Wait for the wrapped optimizer's allreduces (``hvd.DistributedOptimizer`` and
        ``dgc.horovod.DistributedOptimizer`` both have ``synchronize()``)."""
        optimizer.synchronize()  # type: ignore[attr-defined]

    def skip_synchronize(self, optimizer: torch.optim.Optimizer) -> AbstractContextManager[Any]:
        return optimizer.skip_synchronize()  # type: ignore[attr-defined]

    # Horovod pairs collectives by name: name them, or ranks passing objects of different types
    # (broadcast_object's default name is the type's) wait for each other forever.
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t.copy_(self.hvd.allreduce(t, op=self.hvd.Sum, name="dgc.training.all_reduce_sum"))
        return t

    def broadcast_object(self, obj: Any) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=0, name="dgc.training.broadcast_object")

    def barrier(self) -> None:
        self.hvd.barrier() if hasattr(self.hvd, "barrier") else self.hvd.allreduce(torch.zeros(1))

    def shutdown(self) -> None:
        self.hvd.shutdown()
