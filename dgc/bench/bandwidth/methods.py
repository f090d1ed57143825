"""The methods the benchmark compares, each built from the class the training loop uses for it.

``dense`` is :class:`~dgc.training.communication.Allreduce` (DDP's own bucketed allreduce, what
training without ``+compress`` runs); ``fp16`` and ``powersgd-r*`` are
:class:`~dgc.training.torch_hooks.FP16Compression` and
:class:`~dgc.training.torch_hooks.PowerSGD` (PyTorch's hooks, ``compress=fp16`` /
``compress=powersgd``); ``topk``, ``dgc`` and ``dgc-fp16`` are
:class:`~dgc.training.dgc_communication.DGCCommunication` (``compress=topk`` / ``compress=dgc``).
Each also shapes the optimizer as in training (:meth:`Communication.make_optimizer`: DGC with
momentum gets :class:`dgc.DGCSGD`, the others SGD with momentum 0.9).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

import dgc
from dgc.training.communication import Allreduce, Communication
from dgc.training.dgc_communication import DGCCommunication
from dgc.training.torch_hooks import FP16Compression, PowerSGD

__all__ = ["METHODS", "MethodContext", "MethodSpec", "optimizer_config"]

#: PowerSGD's bucket on gloo when none is asked for: one bucket for every model here. PyTorch's
#: hook launches its second allreduce from a Future callback, and with several buckets gloo
#: pairs messages of different buckets ("Received data size doesn't match expected size"; see
#: docs/algorithm.md#collectives-from-the-hook-call). NCCL has no such problem.
POWERSGD_GLOO_BUCKET_MB = 1024.0


@dataclass(kw_only=True, slots=True, frozen=True)
class MethodContext:
    """What a method's construction depends on."""

    backend: str
    """The backend that moves the bytes: ``gloo`` or ``nccl``."""
    powersgd_bucket_cap_mb: float | None = None
    """PowerSGD's DDP bucket size; None = one bucket on gloo, DDP's ``bucket_cap_mb`` on NCCL."""


@dataclass(kw_only=True, slots=True, frozen=True)
class MethodSpec:
    """One gradient exchange of the benchmark."""

    name: str
    description: str
    build: Callable[[MethodContext], Communication]
    """A fresh instance of the training loop's class for it (one per run: they hold state)."""


def optimizer_config(lr: float) -> DictConfig:
    """The ``optim`` config every method gets (``conf/optim/sgd.yaml``'s shape): SGD, momentum
    0.9 (DGC with momentum correction moves the momentum into its state instead)."""
    return OmegaConf.create(
        {"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr, "momentum": 0.9}
    )


def _dgc(name: str, **fields: object) -> Callable[[MethodContext], Communication]:
    def build(ctx: MethodContext) -> Communication:
        config = dgc.DGCConfig(density=0.001, dense_steps=2, log_every=0, **fields)
        return DGCCommunication(config=config, name=name)

    return build


def _powersgd(rank: int) -> Callable[[MethodContext], Communication]:
    def build(ctx: MethodContext) -> Communication:
        cap = ctx.powersgd_bucket_cap_mb
        if cap is None and ctx.backend != "nccl":
            cap = POWERSGD_GLOO_BUCKET_MB
        # vanilla allreduce for 2 steps: the minimum with error feedback and warm start
        return PowerSGD(matrix_approximation_rank=rank, start_powerSGD_iter=2, bucket_cap_mb=cap)

    return build


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(name="dense", build=lambda ctx: Allreduce(),
                   description="fp32 allreduce (DDP's own, no hook: training without +compress)"),
        MethodSpec(name="fp16", build=lambda ctx: FP16Compression(),
                   description="fp16 allreduce (compress=fp16: default_hooks.fp16_compress_hook)"),
        MethodSpec(name="powersgd-r1", build=_powersgd(1),
                   description="PowerSGD rank 1 (compress=powersgd)"),
        MethodSpec(name="powersgd-r4", build=_powersgd(4),
                   description="PowerSGD rank 4 (compress=powersgd)"),
        MethodSpec(name="topk", build=_dgc("topk", momentum=0.0),
                   description="top-k 0.1% with error feedback (compress=topk) + SGD momentum"),
        MethodSpec(name="dgc", build=_dgc("dgc", momentum=0.9),
                   description="DGC 0.1%, momentum correction, fp32 values (compress=dgc)"),
        MethodSpec(name="dgc-fp16", build=_dgc("dgc-fp16", momentum=0.9, value_dtype="float16"),
                   description="DGC 0.1%, momentum correction, fp16 values"),
    )
}
