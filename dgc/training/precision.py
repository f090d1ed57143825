"""``train.precision``: float32, bfloat16 autocast, or float16 autocast with loss scaling.

* ``32``: nothing changes.
* ``bf16``: the forward pass (and the evaluation) runs under ``torch.autocast(device_type,
  dtype=torch.bfloat16)`` on the model's device, CPUs included.  bfloat16 has float32's range: no
  loss scaling.
* ``fp16``: autocast with float16, and ``torch.amp.GradScaler``: the loss is multiplied by the scale
  S before ``backward()`` so that small gradients survive the float16 activations, a step whose
  gradients overflow is skipped and S halves, S doubles after ``train.loss_scale_growth_interval``
  good steps.

Where the scale is taken off matters for compression.  Every parameter's gradient is *unscaled the
moment it is complete* (a tensor hook, before ``train.local_grad_clip``'s and before DDP buckets it):
the gradients that reach the comm hook are in true units, so DGC's residuals, momentum, weight decay
and clipping mean what they mean in float32, and a change of S needs no rescaling of what DGC keeps.
Before the optimizer step the averaged gradients are multiplied by S again (exact: S is a power of
two) and handed to ``GradScaler`` as usual, which checks them for Inf/NaN, skips or applies the
step and updates S.  A gradient that overflowed is Inf on the rank that computed it; the comm hook
must hand it on rather than raise: DGC and the quantized compressors run with
``nonfinite="propagate"`` (every residual kept, see :func:`prepare_communication`), DDP's allreduce
and the fp16 hook propagate it anyway, and PowerSGD (whose error feedback would keep the Inf) is
refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from dgc.config import DGCConfig
from dgc.quant import QuantConfig
from dgc.training.communication import Communication
from dgc.training.dgc_communication import DGCCommunication
from dgc.training.quant_communication import QuantCommunication
from dgc.training.runtime import Runtime
from dgc.training.schema import TrainConfig

__all__ = ["Precision", "check_communication", "prepare_communication"]

log = logging.getLogger(__name__)

_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _config_of(comm: Communication) -> DGCConfig | QuantConfig | None:
    """The compress option's own config where it has a non-finite rule (DGC, quantized)."""
    if isinstance(comm, DGCCommunication):
        return comm.config
    if isinstance(comm, QuantCommunication):
        return comm.quant_config
    return None


def check_communication(comm: Communication, settings: TrainConfig) -> None:
    """Refuse a compress option that cannot survive fp16's skipped steps (before any process
    group starts)."""
    if settings.precision != "fp16":
        return
    if comm.name == "powersgd":
        raise ValueError("train.precision=fp16 cannot run with compress=powersgd: PowerSGD's error "
                         "feedback would keep the Inf of an overflowing step forever. Use "
                         "train.precision=bf16 (no loss scaling), or +compress=dgc/topk/fp16.")
    config = _config_of(comm)
    if config is not None and not config.check_finite:
        raise ValueError(f"train.precision=fp16 with compress={comm.name} needs "
                         "compress.config.check_finite=true: the loss scaler skips steps whose "
                         "gradients overflow, and unchecked they would enter the residuals.")


def prepare_communication(comm: Communication, settings: TrainConfig) -> None:
    """fp16 with DGC or a quantized compressor: ``nonfinite="propagate"``, so an overflowing step
    hands NaN gradients to GradScaler (which skips it) and every rank keeps every residual,
    instead of raising."""
    config = _config_of(comm) if settings.precision == "fp16" else None
    if config is None or config.nonfinite == "propagate":
        return
    propagate = dataclasses.replace(config, nonfinite="propagate")
    if isinstance(comm, DGCCommunication):
        comm.config = propagate
    elif isinstance(comm, QuantCommunication):
        comm.quant_config = propagate
    log.info("train.precision=fp16: compress.config.nonfinite set to 'propagate' (an overflowing "
             "step is skipped by the loss scaler; every residual is kept)")


class Precision:
    """Autocast and loss scaling for one run.

    Args:
        settings: ``train.precision``, ``train.loss_scale``, ``train.loss_scale_growth_interval``.
        device: the model's device (autocast's ``device_type``).
    """

    def __init__(self, settings: TrainConfig, device: torch.device) -> None:
        self.mode = settings.precision
        self.dtype = _DTYPES[self.mode]
        self.device_type = device.type
        self.scaler: torch.amp.GradScaler | None = None
        if self.mode == "fp16":
            self.scaler = torch.amp.GradScaler(
                device.type, init_scale=float(settings.loss_scale),
                growth_interval=settings.loss_scale_growth_interval)
            # A skipped first step is GradScaler doing its job, not a misordered LR schedule.
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message=r"Detected call of `lr_scheduler\.step\(\)` before")
        self._inv_scale = 1.0
        self.skipped_steps = 0
        """Steps the loss scaler skipped (their gradients overflowed)."""

    def autocast(self) -> AbstractContextManager[Any]:
        """The context of the forward pass (and of the evaluation)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def attach(self, model: nn.Module) -> None:
        """fp16: unscale each parameter's gradient as soon as it is complete.  Call before any other
        gradient hook (``train.local_grad_clip``) and before DDP wraps the model."""
        if self.scaler is None:
            return
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(self._unscale)

    def _unscale(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self._inv_scale

    @property
    def loss_scale(self) -> float | None:
        """GradScaler's current scale (fp16), else None."""
        return None if self.scaler is None else float(self.scaler.get_scale())

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, with the loss scaled under fp16.  The gradients are averaged
        (communication) inside: DDP's hook runs bucket by bucket."""
        if self.scaler is None:
            loss.backward()
            return
        self._inv_scale = 1.0 / float(self.scaler.get_scale())
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter],
             runtime: Runtime, *, grad_clip: float | None) -> bool:
        """The optimizer step, with optional clipping of the averaged gradient (to ``grad_clip``)
        and, under fp16, GradScaler's check.  Returns False if the step was skipped."""
        params = list(params)
        if self.scaler is None and grad_clip is None:
            optimizer.step()  # Horovod's optimizer finishes its allreduces in step()
            return True
        runtime.synchronize(optimizer)  # SYNC (Horovod): the averaged gradients are in p.grad
        if self.scaler is not None:
            scale = float(self.scaler.get_scale())
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)  # back into GradScaler's units (exact)
            self.scaler.unscale_(optimizer)  # and out again, checking for Inf/NaN
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        with runtime.skip_synchronize(optimizer):
            if self.scaler is None:
                optimizer.step()
                return True
            self.scaler.step(optimizer)  # skipped if a gradient is Inf/NaN (the same on every rank)
        self.scaler.update()
        applied = float(self.scaler.get_scale()) >= scale  # a skipped step backs the scale off
        self.skipped_steps += not applied
        return applied

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "skipped_steps": self.skipped_steps,
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
