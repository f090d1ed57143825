"""Per-rank state of the quantized exchange: residuals per parameter, step counter, statistics.

The residual of a parameter holds, per element, what this worker still owes the others:

* phase 1 (the shards it quantized for the other workers): ``corrected - sent``;
* phase 2 (the shard it owns): ``N * (average - delivered)``.  The owner's own contribution
  travels exactly, so adding ``N * e`` to it next step adds exactly ``e`` to next step's average:
  this is error feedback on the second phase, kept by the owner for its shard, in the same
  per-parameter tensor (so it survives DDP's bucket rebuild and changes of shard boundaries).

Summed over ranks, ``N * delivered + sum(new residuals) == sum(gradients + old residuals)`` for every
element (to float32 rounding): nothing is lost.  A step with a non-finite gradient on any rank puts
every bucket's corrected gradient (gradient + old residual) back into the residuals on every rank
that had a finite one (the non-finite gradient itself is dropped), leaves the same gradients on every
rank (zero, or NaN with ``nonfinite="propagate"``), is not counted, and, with ``"raise"``, raises
``dgc.errors.NonFiniteGradientError`` (a ``FloatingPointError``) from ``backward()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dgc.stats import CompressionStats

from .config import QuantConfig
from .exchange import ExchangePlan

__all__ = ["BucketLayout", "QuantState"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BucketLayout:
    """Which parameters a DDP bucket holds, and where, by name."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]


class QuantState:
    """State of :func:`dgc.quant.quant_hook`: ``ddp_model.register_comm_hook(state, quant_hook)``.

    Args:
        config: the validated :class:`~dgc.quant.QuantConfig`.
        named_parameters: the model's ``named_parameters()`` (residuals and checkpoints are keyed
            by name, so they survive DDP's bucket rebuild and a restart).
        process_group: the DDP process group (None = the default group).
    """

    def __init__(self, config: QuantConfig, named_parameters: Iterable[tuple[str, nn.Parameter]],
                 process_group: dist.ProcessGroup | None = None) -> None:
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a dgc.quant.QuantConfig, got {type(config).__name__}")
        self.config = config
        self.quantizer = config.quantizer()
        self.process_group = process_group
        ready = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(process_group) if ready else 1
        self.rank = dist.get_rank(process_group) if ready else 0
        self._names = {id(p): name for name, p in named_parameters}
        if not self._names:
            raise ValueError("named_parameters is empty: pass model.named_parameters().")
        self.residuals: dict[str, Tensor] = {}
        """Per parameter name: flat float32 residual (error feedback on; empty otherwise)."""
        self.step = 0
        """Communication steps done (the last bucket of a step increments it)."""
        self.stats = CompressionStats()
        """The last finished step's traffic (payload convention of :class:`dgc.CompressionStats`)."""
        self.network_bytes = 0
        """Bytes this worker put on the network in the last finished step: ``(N - 1)`` messages
        in each phase (compare with a ring allreduce's ``2 (N - 1) / N * n * 4``)."""
        self._pending = CompressionStats()
        self._pending_network = 0
        self._log: list[tuple[BucketLayout, Tensor]] = []
        self._inflight: list[tuple[Tensor, list[Tensor], torch.futures.Future]] = []
        self.failed: list[int] | None = None
        """Ranks with a non-finite gradient in the current step (None: none so far)."""

    # ------------------------------------------------------------------ layout and residuals
    def layout(self, params: Iterable[Tensor]) -> BucketLayout:
        names, offsets, numels, off = [], [], [], 0
        for p in params:
            name = self._names.get(id(p))
            if name is None:
                raise KeyError("a DDP bucket holds a parameter missing from named_parameters: build "
                               "QuantState from the wrapped model's own named_parameters().")
            names.append(name)
            offsets.append(off)
            numels.append(p.numel())
            off += p.numel()
        return BucketLayout(tuple(names), tuple(offsets), tuple(numels))

    def corrected(self, layout: BucketLayout, plan: ExchangePlan, buffer: Tensor) -> Tensor:
        """``buffer + residual`` as float32, zero-padded to ``plan.padded``."""
        out = torch.zeros(plan.padded, dtype=torch.float32, device=buffer.device)
        out[: buffer.numel()] = buffer
        if self.config.error_feedback:
            for name, off, numel in zip(layout.names, layout.offsets, layout.numels, strict=True):
                r = self.residuals.get(name)
                if r is not None:
                    out[off : off + numel] += r.to(buffer.device)
        return out

    def store(self, layout: BucketLayout, flat: Tensor) -> None:
        """New residuals of the bucket's parameters from ``flat`` (bucket positions)."""
        for name, off, numel in zip(layout.names, layout.offsets, layout.numels, strict=True):
            self.residuals[name] = flat[off : off + numel].clone()

    def finite(self, buffer: Tensor) -> bool:
        return not self.config.check_finite or bool(torch.isfinite(buffer).all())

    def generator(self, bucket_index: int, phase: int, device: torch.device) -> torch.Generator | None:
        """This rank's random stream for one bucket and phase (None: deterministic rounding)."""
        if not self.quantizer.stochastic:
            return None
        g = torch.Generator(device=device)
        key = (int(self.config.seed), self.rank, self.step, bucket_index, phase)
        g.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)
        return g

    # ------------------------------------------------------------------ the step, as a whole
    def log(self, layout: BucketLayout, corrected: Tensor) -> None:
        """Remember a bucket's corrected gradient until the step ends (to undo it on failure)."""
        if self.config.error_feedback and self.config.check_finite:
            self._log.append((layout, corrected))

    def fail(self, layout: BucketLayout, corrected: Tensor, finite: bool, ranks: list[int]) -> None:
        """A non-finite gradient (first seen in this bucket, or earlier in the step): every bucket
        of the step keeps its corrected gradient in the residuals; a non-finite one is dropped."""
        if self.failed is None:
            self.failed = ranks
            if self.rank == 0:
                log.warning("quant: non-finite gradient from rank(s) %s at step %d; the step's "
                            "gradients stay in the residuals", ranks, self.step)
        if not self.config.error_feedback:
            return
        for old_layout, old in self._log:
            self.store(old_layout, old)
        self._log.clear()
        if finite:
            self.store(layout, corrected)

    def track(self, buffer: Tensor, params: list[Tensor], fut: torch.futures.Future) -> None:
        """A bucket of the current step, its parameters and the future that fills it."""
        self._inflight.append((buffer, params, fut))

    def fill_step(self, value: float) -> None:
        """Wait for every bucket of the step, then set its buffer and its parameters' gradients
        to ``value`` (the same on every rank; DDP copies no buffer back when backward raises)."""
        for buffer, params, fut in self._inflight:
            fut.wait()
            buffer.fill_(value)
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(value)

    def record(self, *, sent: int, received: int, network: int, dense: int, elements: int,
               elements_sent: int) -> None:
        self._pending.add(sent=sent, received=received, dense=dense, elements=elements,
                          elements_sent=elements_sent)
        self._pending.sparse_buckets += 1
        self._pending_network += network

    def end_step(self, *, failed: bool = False) -> None:
        """Publish the step's statistics; a failed step is not counted (``step`` stays)."""
        self._pending.step = self.step
        self._pending.density = self._pending.achieved_density
        self.stats, self._pending = self._pending, CompressionStats()
        self.network_bytes, self._pending_network = self._pending_network, 0
        self._log.clear()
        self._inflight.clear()
        self.failed = None
        if not failed:
            self.step += 1

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """This rank's residuals by parameter name, and the step (``weights_only``-safe)."""
        return {"method": self.config.method, "step": self.step,
                "residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.config.method:
            raise ValueError(f"the checkpoint's quantized state was written with method="
                             f"{state.get('method')!r}, this state has {self.config.method!r}; "
                             "resume with the same QuantConfig.method.")
        unknown = set(state["residuals"]) - set(self._names.values())
        if unknown:
            raise ValueError(f"the checkpoint has residuals for unknown parameters "
                             f"{sorted(unknown)[:4]}: load it into the same model.")
        self.step = int(state["step"])
        self.residuals = {k: v.to(torch.float32).clone() for k, v in state["residuals"].items()}
