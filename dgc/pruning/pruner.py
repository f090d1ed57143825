"""The pruner: owns the masks of a model's weights and keeps pruned weights at exactly zero.

Masks live on the pruned modules as bool buffers named ``weight_mask`` (True = keep), so they
are part of ``model.state_dict()``, survive ``torch.save``/``load_state_dict`` and
``copy.deepcopy``, and move with ``model.to(device)``. (``torch.ao.pruning`` keeps them in the
sparsifier and loses them on save; ``torch.nn.utils.prune`` reparametrizes ``weight``.)

How pruned weights stay zero, whatever the optimizer does:

1. When masks change, the pruned weights and every optimizer state tensor shaped like the
   weight (SGD momentum, Adam moments, ...) are zeroed, and DGC is told the new masks
   (``DGCState.set_masks``): it never selects or sends those coordinates and keeps their
   momentum and residual at zero.
2. A tensor hook on each pruned weight zeroes the gradient of pruned entries as it is
   produced, before DDP buckets it, DGC compresses it or the loop clips it.
3. An optimizer step post-hook re-applies the masks after every ``optimizer.step()``, so
   weight decay, momentum or any other update rule cannot revive a pruned weight.

Masks are identical on every rank: they are computed from the (synchronized) weights with
stable-sort tie-breaking, and by default rank 0's masks are broadcast as well, one flat
``uint8`` broadcast per mask update, so even weights that drifted by rounding give one mask.

Calling convention (see docs/sparsity.md): build after the model (and optimizer), call
``pruner.step(global_step)`` at the start of every iteration, before the forward pass, with
the number of optimizer steps done so far.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dgc.pruning.granularity import REACH_TOLERANCE, Granularity
from dgc.pruning.schedule import Schedule
from dgc.wrappers import unwrap_model

__all__ = ["DEFAULT_PRUNABLE", "MASK_SUFFIX", "Pruner", "unwrap_model"]

log = logging.getLogger(__name__)

#: Name of the mask buffer registered next to a pruned parameter: ``weight`` -> ``weight_mask``.
MASK_SUFFIX = "_mask"
#: Module types pruned unless ``module_types`` says otherwise.
DEFAULT_PRUNABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass(kw_only=True, slots=True)
class _Target:
    """One pruned parameter: its name in the unwrapped model, module and attribute."""

    name: str  # e.g. "features.0.weight"
    module: nn.Module
    attr: str  # "weight"

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def mask(self) -> Tensor:
        return getattr(self.module, self.attr + MASK_SUFFIX)


class _MaskGrad:
    """Tensor hook: the gradient of pruned entries is zero (reads the live mask buffer)."""

    def __init__(self, target: _Target) -> None:
        self.target = target

    def __call__(self, grad: Tensor) -> Tensor:
        return grad.masked_fill(~self.target.mask, 0)


class _EnforceAfterLoad:
    """``load_state_dict`` post-hook on the pruned model: re-apply the (loaded) masks.

    It holds its pruner by weak reference and copies of it are inert, so
    ``copy.deepcopy(model)`` or pickling the model does not drag the pruner, its optimizer or
    its DGC state along (the copy keeps the mask buffers; a ``Pruner`` built on the copy
    adopts them and registers its own hook).
    """

    __slots__ = ("_pruner",)

    def __init__(self, pruner: Pruner | None = None) -> None:
        self._pruner = None if pruner is None else weakref.ref(pruner)

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        pruner = None if self._pruner is None else self._pruner()
        if pruner is not None and module is pruner.model:
            pruner._masks_changed()

    def __deepcopy__(self, memo: dict) -> _EnforceAfterLoad:
        return _EnforceAfterLoad()

    def __reduce__(self) -> tuple:
        return (_EnforceAfterLoad, ())


class Pruner:
    """Computes, stores and enforces the pruning masks of a model.

    Args:
        model: the model, or a DDP/compiled wrapper of it (names are taken from the
            unwrapped model, so they carry no ``module.`` prefix).
        granularity: how masks are shaped (``Unstructured``, ``Block``, ``BankBalanced``,
            ``NM``, ``Channel``).
        schedule: target sparsity per step (``OneShot``, ``AGP``); step positions must be
            resolved already (``schedule.resolve(total_steps)``; ``build_pruner`` does it).
        include: regexes (``re.fullmatch``) on module names to prune; None = every module of
            ``module_types``.
        exclude: regexes on module names never pruned (e.g. ``["conv1", "fc_out"]``).
        module_types: module classes whose ``weight`` may be pruned.
        min_numel: weights with fewer entries are not pruned (0 = no limit).
        l1: coefficient of an L1 penalty on the pruned layers' weights, added to their
            gradients as ``l1 * sign(w)`` right before each optimizer step, after gradient
            communication, once per step (so gradient accumulation does not scale it);
            pushes weights toward zero ahead of pruning. 0 = off; needs ``optimizer``.
        sync_masks: broadcast rank 0's masks after each update when ``torch.distributed``
            is initialized (one flat uint8 broadcast); False trusts deterministic local
            computation from identical weights.
        process_group: group for that broadcast (None = default group).
        optimizer: optimizer to keep consistent with the masks (``attach_optimizer``).
        dgc_state: ``dgc.DGCState`` to tell about the masks (``attach_dgc``).

    Keep a reference to the pruner for as long as it should act: the model holds it only
    weakly (its ``load_state_dict`` hook), so ``copy.deepcopy(model)`` copies the masks but
    not the pruner, its optimizer or its DGC state.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        granularity: Granularity,
        schedule: Schedule,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        module_types: Iterable[type[nn.Module]] = DEFAULT_PRUNABLE,
        min_numel: int = 0,
        l1: float = 0.0,
        sync_masks: bool = True,
        process_group: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        dgc_state: Any = None,
    ) -> None:
        if not isinstance(granularity, Granularity):
            raise TypeError(f"prune.granularity must be a Granularity, got {granularity!r}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"prune.schedule must be a Schedule, got {schedule!r}")
        if isinstance(l1, bool) or not isinstance(l1, int | float) or l1 < 0:
            raise ValueError(f"prune.l1 must be a number >= 0 (0 = off), got {l1!r}")
        fixed = granularity.fixed_sparsity
        if fixed is not None and abs(schedule.final_sparsity - fixed) > 1e-9:
            raise ValueError(
                f"{type(granularity).__name__} pruning always ends at sparsity {fixed}, but "
                f"prune.schedule.sparsity={schedule.final_sparsity}; set it to {fixed}"
            )
        # Fail now, not at the first step, on fractional step positions.
        schedule.sparsity_at(0)
        self.model = unwrap_model(model)
        self.granularity = granularity
        self.schedule = schedule
        self.l1 = float(l1)
        self.sync_masks = sync_masks
        self.process_group = process_group
        self.targets = self._select_targets(include, tuple(exclude), tuple(module_types),
                                            min_numel)
        if not self.targets:
            raise ValueError(
                "prune: no parameter matched (prune.include / prune.exclude / module_types / "
                "min_numel select nothing); check the module names with model.named_modules()"
            )
        self._handles: list[RemovableHandle] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._dgc_states: list[Any] = []
        self._target_sparsity: float | None = None  # last applied schedule target
        for t in self.targets:
            granularity.check(t.name, t.param)
            self._register_mask(t)
            self._handles.append(t.param.register_hook(_MaskGrad(t)))
        self._handles.append(
            self.model.register_load_state_dict_post_hook(_EnforceAfterLoad(self)))
        self._hide_masks_from_ddp(model)
        self._warn_unreachable()
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        if dgc_state is not None:
            self.attach_dgc(dgc_state)

    # ------------------------------------------------------------------ setup
    def _select_targets(
        self,
        include: Sequence[str] | None,
        exclude: tuple[str, ...],
        module_types: tuple[type[nn.Module], ...],
        min_numel: int,
    ) -> list[_Target]:
        for key, patterns in (("prune.include", include or ()), ("prune.exclude", exclude)):
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ValueError(f"{key} entry {p!r} is not a valid regex: {e}") from e
        targets = []
        for mod_name, module in self.model.named_modules():
            if not isinstance(module, module_types):
                continue
            if include is not None and not any(re.fullmatch(p, mod_name) for p in include):
                continue
            if any(re.fullmatch(p, mod_name) for p in exclude):
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
                continue
            if weight.numel() < min_numel:
                continue
            name = f"{mod_name}.weight" if mod_name else "weight"
            targets.append(_Target(name=name, module=module, attr="weight"))
        return targets

    @staticmethod
    def _register_mask(t: _Target) -> None:
        buf_name = t.attr + MASK_SUFFIX
        existing = getattr(t.module, buf_name, None)
        if existing is not None:  # adopted: a deepcopy or a model that had a pruner before
            if existing.shape != t.param.shape or existing.dtype != torch.bool:
                raise ValueError(
                    f"{t.name}: existing buffer {buf_name} has shape {tuple(existing.shape)} "
                    f"and dtype {existing.dtype}; expected a bool mask of shape "
                    f"{tuple(t.param.shape)}"
                )
            return
        mask = torch.ones_like(t.param, dtype=torch.bool)
        t.module.register_buffer(buf_name, mask, persistent=True)

    def _warn_unreachable(self) -> None:
        """Log (rank 0) the layers whose structure cannot reach the final target sparsity."""
        final = self.schedule.final_sparsity
        if final <= 0 or not _is_rank0():
            return
        for t in self.targets:
            reached = self.granularity.reachable_sparsity(t.param, final)
            if reached is not None and abs(reached - final) > REACH_TOLERANCE:
                log.warning(
                    "prune: %s (shape %s) reaches sparsity %.2f%%, not the target %.2f%%: "
                    "%r cannot do better on this shape; change the granularity's "
                    "parameters or the target, or exclude the layer (prune.exclude)",
                    t.name, tuple(t.param.shape), 100 * reached, 100 * final, self.granularity)

    def _hide_masks_from_ddp(self, wrapper: nn.Module) -> None:
        """Keep DDP from broadcasting the masks before every forward pass.

        DDP (``broadcast_buffers=True``) re-collects the module's buffers each forward and
        broadcasts them from rank 0 whenever the model has any buffer (e.g. batch norm): a
        byte per pruned weight per step, far more than DGC sends. The masks are synchronized
        by ``update_masks`` already, so they are put on DDP's ignore list: for a DDP built
        later via ``_ddp_params_and_buffers_to_ignore``, for an existing wrapper directly.
        """
        names = {t.name + MASK_SUFFIX for t in self.targets}
        ignored = set(getattr(self.model, "_ddp_params_and_buffers_to_ignore", ())) | names
        DDP = nn.parallel.DistributedDataParallel
        DDP._set_params_and_buffers_to_ignore_for_model(self.model, sorted(ignored))
        while wrapper is not self.model:
            if isinstance(wrapper, DDP):
                wrapper.parameters_to_ignore.update(names)
                wrapper = wrapper.module
            elif isinstance(wrapper, nn.DataParallel):
                wrapper = wrapper.module
            else:
                wrapper = wrapper._orig_mod

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-mask after each ``optimizer.step()``; apply L1; zero pruned optimizer state."""
        if optimizer in self._optimizers:
            return
        self._optimizers.append(optimizer)
        self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if self.l1 > 0:
            self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
        self._zero_optimizer_state(optimizer)

    def attach_dgc(self, state: Any) -> None:
        """Tell a ``dgc.DGCState`` the masks now and whenever they change.

        The state's parameter names may be those of the unwrapped model or of its DDP
        wrapper (``module.`` prefix); the mapping is made by parameter identity where the
        state exposes its parameters, else by name.
        """
        if not hasattr(state, "set_masks"):
            raise TypeError(f"attach_dgc needs a dgc.DGCState (with set_masks), got {state!r}")
        if state not in self._dgc_states:
            self._dgc_states.append(state)
        self._push_dgc(state)

    # ------------------------------------------------------------------ queries
    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name (in the unwrapped model) -> bool keep-mask (the live buffers)."""
        return {t.name: t.mask for t in self.targets}

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned entries per pruned parameter."""
        return {t.name: 1.0 - t.mask.float().mean().item() for t in self.targets}

    def global_sparsity(self) -> float:
        """Fraction of pruned entries over all pruned parameters."""
        kept = sum(int(t.mask.sum()) for t in self.targets)
        total = sum(t.mask.numel() for t in self.targets)
        return 1.0 - kept / total

    # ------------------------------------------------------------------ per step
    def step(self, global_step: int) -> bool:
        """Apply the schedule at ``global_step`` (optimizer steps done so far).

        Call at the start of every iteration, before the forward pass. Recomputes the masks
        when the scheduled sparsity changed (and on the first call, so masks loaded from a
        checkpoint are re-applied and sent to DGC). Returns True if the masks were recomputed.
        """
        if self.l1 > 0 and not self._optimizers:
            raise ValueError(
                "prune.l1 > 0 needs the optimizer: build_pruner(model, optimizer=...) or "
                "pruner.attach_optimizer(optimizer)"
            )
        target = self.schedule.sparsity_at(global_step)
        if self._target_sparsity is not None and target == self._target_sparsity:
            return False
        first = self._target_sparsity is None
        self._target_sparsity = target
        if target > 0:
            self.update_masks(target)
            return True
        if first:  # enforce (and share) the masks the model came with, e.g. from a checkpoint
            if self.sync_masks:
                with torch.no_grad():
                    synced = self._broadcast(self.masks)
                    for t in self.targets:
                        t.mask.copy_(synced[t.name])
            self._masks_changed()
        return False

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        """Recompute all masks at ``sparsity`` from the current weights and apply them."""
        weights = {t.name: t.param.detach() for t in self.targets}
        prev = {t.name: t.mask for t in self.targets}
        masks = self.granularity.compute_masks(weights, sparsity, prev)
        if self.sync_masks:
            masks = self._broadcast(masks)
        for t in self.targets:
            t.mask.copy_(masks[t.name])
        self._masks_changed()
        if _is_rank0():
            log.info("pruned to sparsity %.4f (target %.4f) over %d tensors",
                     self.global_sparsity(), sparsity, len(self.targets))

    def _broadcast(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        if not (dist.is_available() and dist.is_initialized()):
            return masks
        if dist.get_world_size(self.process_group) == 1:
            return masks
        names = [t.name for t in self.targets]
        flat = torch.cat([masks[n].reshape(-1) for n in names]).to(torch.uint8)
        src = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
        dist.broadcast(flat, src=src, group=self.process_group)
        out = {}
        for n, part in zip(names, torch.split(flat, [masks[n].numel() for n in names]),
                           strict=True):
            out[n] = part.view(masks[n].shape).bool()
        return out

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights (the optimizer post-step hook calls this)."""
        for t in self.targets:
            t.param.masked_fill_(~t.mask, 0)

    def _masks_changed(self) -> None:
        self.apply_masks()
        for opt in self._optimizers:
            self._zero_optimizer_state(opt)
        for state in self._dgc_states:
            self._push_dgc(state)

    @torch.no_grad()
    def _zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        # Momentum buffers / Adam moments of pruned entries would otherwise keep moving the
        # (re-masked) weight and, for Adam, bias the moments when a weight is never updated.
        for t in self.targets:
            for value in optimizer.state.get(t.param, {}).values():
                if isinstance(value, Tensor) and value.shape == t.param.shape:
                    value.masked_fill_(~t.mask, 0)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.apply_masks()

    @torch.no_grad()
    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for t in self.targets:
            p = t.param
            if p.grad is not None:
                p.grad.add_(torch.sign(p).masked_fill_(~t.mask, 0), alpha=self.l1)

    def _push_dgc(self, state: Any) -> None:
        state.set_masks(self._dgc_masks(state))

    def _dgc_masks(self, state: Any) -> dict[str, Tensor]:
        """Our masks keyed by the names ``state`` uses for the same parameters.

        Matched by parameter identity (``state.name_of``), else by name with or without the
        ``module.`` prefix of a DDP wrapper.
        """
        known = getattr(state, "memory", {})
        out: dict[str, Tensor] = {}
        for t in self.targets:
            try:
                name = state.name_of(t.param)
            except (KeyError, RuntimeError, AttributeError):
                candidates = (t.name, "module." + t.name, t.name.removeprefix("module."))
                name = next((c for c in candidates if c in known), None)
            if name is None:
                raise ValueError(
                    f"attach_dgc: the DGC state has no parameter {t.name!r} (nor with a "
                    "'module.' prefix); build the DGCState from the model the pruner prunes "
                    "(ddp_model.module.named_parameters())"
                )
            out[name] = t.mask
        return out

    # ------------------------------------------------------------------ teardown
    def remove(self, *, make_permanent: bool = True) -> None:
        """Stop pruning: detach all hooks and clear the masks in the attached DGC states.

        ``make_permanent`` also deletes the mask buffers (the zeros stay in the weights, but
        training may now move them), so the ``state_dict`` has no ``*_mask`` keys any more.
        """
        for state in self._dgc_states:
            state.set_masks(dict.fromkeys(self._dgc_masks(state)))
        self._dgc_states.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._optimizers.clear()
        if make_permanent:
            self.apply_masks()
            for t in self.targets:
                delattr(t.module, t.attr + MASK_SUFFIX)
