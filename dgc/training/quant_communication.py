"""``compress=int8``, ``compress=terngrad``, ``compress=qsgd``: the quantized compressors of
:mod:`dgc.quant` in the loop, as a DDP communication hook or, under ``dist=horovod``, as
:func:`dgc.quant.horovod.DistributedOptimizer` (the same two-phase exchange and error feedback).

The optimizer is kept as configured (momentum and weight decay included): the hook or the Horovod
optimizer only replaces the averaging of the gradients.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from dgc.quant import QuantConfig, QuantState, quant_hook
from dgc.stats import CompressionStats
from dgc.training.communication import Communication

__all__ = ["QuantCommunication"]

log = logging.getLogger(__name__)


class QuantCommunication(Communication):
    """:class:`dgc.quant.QuantState` + :func:`dgc.quant.quant_hook` on the DDP model, or
    :func:`dgc.quant.horovod.DistributedOptimizer` around the optimizer (``dist=horovod``).

    Args:
        config: the validated :class:`dgc.quant.QuantConfig` (``compress.config``).
        name: the option's name (``int8``, ``terngrad`` or ``qsgd``), for logs and checkpoints;
            None = ``config.method``.
        bucket_cap_mb: DDP bucket size for this option; None = the ``dist`` config's.  Each
            bucket costs one synchronous all-to-all inside backward, so fewer, larger buckets
            mean fewer stalls (and less scale/padding overhead).  Not used by Horovod, where
            each large parameter is a bucket and the small ones share one per dtype.
    """

    def __init__(self, *, config: QuantConfig, name: str | None = None,
                 bucket_cap_mb: float | None = None) -> None:
        if not isinstance(config, QuantConfig):
            raise TypeError(f"compress.config must build a dgc.quant.QuantConfig, got "
                            f"{type(config).__name__}")
        if bucket_cap_mb is not None and not bucket_cap_mb > 0:
            raise ValueError(f"compress.bucket_cap_mb = {bucket_cap_mb!r} is invalid: it must be "
                             "> 0, or null for the dist config's value.")
        self.quant_config = config
        self.name = name or config.method
        self.bucket_cap_mb = bucket_cap_mb
        self._state: QuantState | None = None

    def check(self, *, dist_name: str, optim: DictConfig) -> None:
        if dist_name not in ("ddp", "horovod"):
            raise ValueError(f"compress={self.name} runs under dist=ddp or dist=horovod, not "
                             f"dist={dist_name}.")
        if dist_name == "horovod":
            try:
                import dgc.quant.horovod  # noqa: F401
            except ImportError as e:
                raise ValueError(f"compress={self.name} with dist=horovod needs dgc.quant.horovod "
                                 f"and Horovod (bash launch/install_horovod.sh): {e}") from e

    def ddp_kwargs(self) -> dict[str, Any]:
        return {} if self.bucket_cap_mb is None else {"bucket_cap_mb": self.bucket_cap_mb}

    def attach_ddp(self, ddp_model: nn.parallel.DistributedDataParallel,
                   optimizer: torch.optim.Optimizer) -> None:
        self._state = QuantState(self.quant_config, ddp_model.module.named_parameters(),
                                 process_group=ddp_model.process_group)
        ddp_model.register_comm_hook(self._state, quant_hook)

    def wrap_horovod(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        from dgc.quant.horovod import DistributedOptimizer

        wrapped = DistributedOptimizer(optimizer, model.named_parameters(),
                                       config=self.quant_config)
        self._state = wrapped.quant_state  # also inside wrapped.state_dict()["quant"], per rank
        return wrapped

    @property
    def quant_state(self) -> QuantState:
        if self._state is None:
            raise RuntimeError("the quantized state exists once attach_ddp()/wrap_horovod() ran")
        return self._state

    def step_stats(self) -> CompressionStats:
        return self.quant_state.stats

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "quant": self.quant_state.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.quant_state.load_state_dict(state["quant"])

    def describe(self) -> str:
        c = self.quant_config
        q = c.quantizer()
        grid = {"int8": f"{q.bits} bits", "terngrad": "ternary, 2 bits",
                "qsgd": f"{q.levels} levels, {q.bits} bits"}[c.method]
        scale = f"a scale per {c.chunk_size} elements" if c.chunk_size else "a scale per shard"
        rounding = "stochastic" if q.stochastic else "round-to-nearest"
        feedback = "error feedback" if c.error_feedback else "no error feedback (unbiased)"
        return (f"{c.method} ({grid}, {scale}, {rounding}, {feedback}): two-phase "
                "all-to-all + all-gather")
