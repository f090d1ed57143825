"""The methods the benchmark compares, each built from the class the training loop uses for it.

``dense`` is :class:`~dgc.training.communication.Allreduce` (DDP's own bucketed allreduce, what
training without ``+compress`` runs); ``dense-hook`` the same allreduce from PyTorch's Python comm
hook ``default_hooks.allreduce_hook`` (what any Python hook costs: the baseline of DGC's dense path);
``fp16`` and ``powersgd-r*`` are
:class:`~dgc.training.torch_hooks.FP16Compression` and
:class:`~dgc.training.torch_hooks.PowerSGD` (PyTorch's hooks, ``compress=fp16`` /
``compress=powersgd``); ``topk``, ``dgc``, ``dgc-fp16`` and the policy/hierarchy variants
(``dgc-dense``, ``dgc-auto``, ``dgc-node``, ``dgc@0.25``, ``dgc-auto@0.25``; docs/policy.md) are
:class:`~dgc.training.dgc_communication.DGCCommunication` (``compress=topk`` / ``compress=dgc``,
with ``compress.config.policy=...`` / ``compress.config.hierarchy=node``); ``dgc-int8`` is the same
class with int8 values (``compress.config.value_dtype=int8``); ``int8``, ``terngrad`` and ``qsgd``
are :class:`~dgc.training.quant_communication.QuantCommunication` (``compress=int8`` /
``compress=terngrad`` / ``compress=qsgd``: the two-phase all-to-all + all-gather of
:mod:`dgc.quant`, error feedback on, the options' defaults).
Each also shapes the optimizer as in training (:meth:`Communication.make_optimizer`: DGC with
momentum gets :class:`dgc.DGCSGD`, the others, the quantized ones included, SGD with momentum 0.9).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

import dgc
from dgc.quant import QuantConfig
from dgc.training.communication import Allreduce, Communication
from dgc.training.dgc_communication import DGCCommunication
from dgc.training.quant_communication import QuantCommunication
from dgc.training.torch_hooks import FP16Compression, PowerSGD

from .python_hook import PythonAllreduce
from .quant_probe import ProbeCommunication

__all__ = ["AUTO_INTERVAL", "METHODS", "QUANT_METHODS", "SWEEP_METHODS", "MethodContext", "MethodSpec",
           "WARMUP_DENSITY", "least_warmup", "optimizer_config"]

#: PowerSGD's bucket on gloo when none is asked for: one bucket for every model here. PyTorch's
#: hook launches its second allreduce from a Future callback, and with several buckets gloo
#: pairs messages of different buckets ("Received data size doesn't match expected size"; see
#: docs/algorithm.md#collectives-from-the-hook-call). NCCL has no such problem.
POWERSGD_GLOO_BUCKET_MB = 1024.0

AUTO_INTERVAL = 2
"""``policy_interval`` of the ``dgc-auto`` methods: the library's default (100 steps) is longer than
a benchmark run, so the benchmark re-decides every 2 steps."""

WARMUP_DENSITY = 0.25
"""Density of the warm-up's first stage (0.25 -> 0.0625 -> ... -> 0.001): the ``@0.25`` methods."""

DENSE_STEPS = 2
"""DGC's dense steps in every DGC method (the link samples of ``policy="auto"``)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class MethodContext:
    """What a method's construction depends on."""

    backend: str
    """The backend that moves the bytes: ``gloo`` or ``nccl``."""
    powersgd_bucket_cap_mb: float | None = None
    """PowerSGD's DDP bucket size; None = one bucket on gloo, DDP's ``bucket_cap_mb`` on NCCL."""
    codec_world_size: int | None = None
    """None: the real run. N: the one-rank codec run (``measure_codec``) of a run of N processes,
    where the quantized methods (one worker of which quantizes nothing) do one of N workers' work
    with the collectives looped back (:mod:`.quant_probe`); N = 1 builds the real class."""


@dataclass(kw_only=True, slots=True, frozen=True)
class MethodSpec:
    """One gradient exchange of the benchmark."""

    name: str
    description: str
    build: Callable[[MethodContext], Communication]
    """A fresh instance of the training loop's class for it (one per run: they hold state)."""
    warmup: int = 3
    """Least unmeasured steps: DDP's bucket rebuild after step 1, DGC's 2 dense steps, PowerSGD's 2
    vanilla steps; ``dgc-auto`` also its first two decisions (the second one with measured codec times)."""


def optimizer_config(lr: float) -> DictConfig:
    """The ``optim`` config every method gets (``conf/optim/sgd.yaml``'s shape): SGD, momentum
    0.9 (DGC with momentum correction moves the momentum into its state instead)."""
    return OmegaConf.create(
        {"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr, "momentum": 0.9}
    )


def least_warmup(names: tuple[str, ...] | list[str]) -> int:
    """Unmeasured steps the methods ``names`` need (the largest of their :attr:`MethodSpec.warmup`)."""
    return max((METHODS[n].warmup for n in names), default=3)


def _dgc(name: str, density: float = 0.001, **fields: object) -> Callable[[MethodContext], Communication]:
    def build(ctx: MethodContext) -> Communication:
        config = dgc.DGCConfig(density=density, dense_steps=DENSE_STEPS, log_every=0, **fields)
        return DGCCommunication(config=config, name=name)

    return build


#: dgc-auto: the 2 dense steps (link samples), a decision from them and the selection probe, a second
#: one with the codec times measured meanwhile; measured from the third decision on.
_AUTO_WARMUP = DENSE_STEPS + 2 * AUTO_INTERVAL
_AUTO = {"policy": "auto", "policy_interval": AUTO_INTERVAL}


def _quant(method: str, **fields: object) -> Callable[[MethodContext], Communication]:
    """``compress=<method>``: :class:`QuantConfig` with the option's defaults (error feedback,
    round to nearest, a scale per 512 elements) and the dist config's DDP buckets; in the codec
    run of N > 1 processes, the same config on :mod:`.quant_probe`'s one-of-N-workers hook."""
    def build(ctx: MethodContext) -> Communication:
        config = QuantConfig(method=method, **fields)
        n = ctx.codec_world_size
        if n is not None and n > 1:
            return ProbeCommunication(config=config, name=method, world_size=n)
        return QuantCommunication(config=config, name=method)

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
        MethodSpec(name="dense-hook", build=lambda ctx: PythonAllreduce(),
                   description="fp32 allreduce from PyTorch's Python comm hook (default_hooks.allreduce_hook)"),
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
        MethodSpec(name="dgc-int8", build=_dgc("dgc-int8", momentum=0.9, value_dtype="int8"),
                   description="DGC 0.1%, momentum correction, int8 values (and int8 dense tensors)"),
        MethodSpec(name="int8", build=_quant("int8", bits=8),
                   description="int8, a scale per 512 elements, error feedback: two-phase "
                               "all-to-all + all-gather (compress=int8)"),
        MethodSpec(name="terngrad", build=_quant("terngrad"),
                   description="TernGrad, 2 bits packed, a scale per 512 elements, error feedback: "
                               "two-phase (compress=terngrad)"),
        MethodSpec(name="qsgd", build=_quant("qsgd", levels=7),
                   description="QSGD, 7 levels (4 bits), a norm per 512 elements, error feedback: "
                               "two-phase (compress=qsgd)"),
        MethodSpec(name="dgc-dense", build=_dgc("dgc-dense", momentum=0.9, policy="dense"),
                   description="DGC's state, every bucket a dense allreduce (compress.config.policy=dense)"),
        MethodSpec(name="dgc-auto", build=_dgc("dgc-auto", momentum=0.9, **_AUTO),
                   warmup=_AUTO_WARMUP,
                   description=f"DGC 0.1%, sparse or dense per bucket from the cost model "
                               f"(policy=auto, policy_interval={AUTO_INTERVAL})"),
        MethodSpec(name="dgc-node", build=_dgc("dgc-node", momentum=0.9, hierarchy="node"),
                   description="DGC 0.1% between nodes, dense inside a node, each local rank its "
                               "share (compress.config.hierarchy=node)"),
        MethodSpec(name=f"dgc@{WARMUP_DENSITY:g}", build=_dgc(f"dgc@{WARMUP_DENSITY:g}", WARMUP_DENSITY, momentum=0.9),
                   description=f"DGC at density {WARMUP_DENSITY:g} (the warm-up's first stage)"),
        MethodSpec(name=f"dgc-auto@{WARMUP_DENSITY:g}",
                   build=_dgc(f"dgc-auto@{WARMUP_DENSITY:g}", WARMUP_DENSITY, momentum=0.9, **_AUTO), warmup=_AUTO_WARMUP,
                   description=f"policy=auto at density {WARMUP_DENSITY:g}"),
    )
}

QUANT_METHODS: tuple[str, ...] = ("dense", "int8", "terngrad", "qsgd", "dgc", "dgc-int8")
"""The quantization comparison (docs/bandwidth.md#quantized-gradients): dense allreduce, the three
quantized compressors, DGC with fp32 and with int8 values."""

SWEEP_METHODS: tuple[str, ...] = ("dense", "fp16", "powersgd-r1", "powersgd-r4", "topk", "dgc", "dgc-fp16")
"""The methods of the bandwidth sweep (``--methods`` default; ``all`` = every method of :data:`METHODS`,
the policy sweep picks its own: docs/policy.md)."""
