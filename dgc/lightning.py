"""PyTorch Lightning: ``Trainer(strategy=DGCStrategy(DGCConfig(...)))`` in place of ``strategy="ddp"``.

A :class:`DDPStrategy` that adds DGC (see docs/integrations.md#lightning):

* builds the :class:`~dgc.DGCState` from the LightningModule's parameters and registers
  :func:`dgc.ddp_comm_hook` once DDP wraps the module, on every device type: Lightning's own
  ``DDPStrategy(ddp_comm_hook=...)`` registers comm hooks only when the root device is CUDA, so on
  CPU the hook it is given never runs;
* refuses an optimizer that would apply momentum or weight decay a second time
  (:func:`dgc.check_optimizer`), and ``16-mixed`` precision unless ``DGCConfig(nonfinite="propagate")``
  (its ``GradScaler`` must see the NaN of a skipped step instead of an exception);
* logs the traffic of each optimizer step through the LightningModule's logger (``dgc/...`` keys);
* saves every rank's DGC state (residuals and momenta differ between ranks) in the Lightning
  checkpoint, gathered to rank 0 under :data:`CHECKPOINT_KEY`, and gives each rank its own back on
  ``Trainer.fit(ckpt_path=...)``, so a resumed run continues exactly.

Needs the ``lightning`` package (``pip install 'dgc[lightning]'``); ``import dgc`` does not import it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel

from .config import DGCConfig
from .optim import check_optimizer, register
from .state import DGCState

__all__ = ["CHECKPOINT_KEY", "DGCStrategy"]

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "dgc_states"
"""Key of the Lightning checkpoint that holds the list of every rank's ``DGCState.state_dict()``."""

_HOOK_KWARGS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor moved to the CPU (for pickling to another rank)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


class DGCStrategy(DDPStrategy):
    """Lightning's DDP strategy with Deep Gradient Compression.

    Args:
        config: the DGC hyperparameters (:class:`dgc.DGCConfig`).
        log_traffic: log ``dgc/bytes_sent``, ``dgc/dense_bytes``, ``dgc/compression_ratio``,
            ``dgc/density`` and ``dgc/achieved_density`` of every optimizer step through
            ``LightningModule.log`` (rank 0's figures).
        **ddp_kwargs: everything :class:`lightning.pytorch.strategies.DDPStrategy` takes
            (``find_unused_parameters``, ``static_graph``, ``gradient_as_bucket_view``,
            ``process_group_backend``, ...) except the comm-hook arguments, which DGC sets.

    ``strategy.dgc_state`` is the :class:`dgc.DGCState` once ``Trainer.fit`` has set the model up
    (``None`` before): ``dgc_state.step`` counts communication steps, ``dgc_state.stats`` holds the
    last one's traffic.
    """

    def __init__(self, config: DGCConfig, *, log_traffic: bool = True, **ddp_kwargs: Any) -> None:
        if not isinstance(config, DGCConfig):
            raise TypeError(
                f"DGCStrategy(config) must be a dgc.DGCConfig, got {type(config).__name__}: "
                "pass DGCStrategy(dgc.DGCConfig(density=0.001, ...))."
            )
        given = sorted(k for k in _HOOK_KWARGS if ddp_kwargs.get(k) is not None)
        if given:
            raise ValueError(
                f"DGCStrategy sets the DDP comm hook itself; {given} cannot be combined with it. "
                "Drop them, or use lightning's DDPStrategy for another hook."
            )
        super().__init__(**ddp_kwargs)
        self.dgc_config = config
        self.log_traffic = log_traffic
        self.dgc_state: DGCState | None = None
        self._resume_state: Mapping[str, Any] | None = None
        self._logged_step = -1

    # ------------------------------------------------------------------ setup
    def _register_ddp_hooks(self) -> None:
        # Lightning registers its comm hook here only on CUDA; DGC's is registered in setup(), on
        # every device type, once the optimizers exist (they are checked first).
        return None

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._attach_dgc()

    def _attach_dgc(self) -> None:
        if not isinstance(self.model, DistributedDataParallel):
            raise TypeError(
                f"DGCStrategy expected DDP to wrap the LightningModule, found {type(self.model).__name__}."
            )
        self._check_precision()
        for optimizer in self.optimizers:
            check_optimizer(optimizer, self.dgc_config)
        # One optimizer: dgc.register hooks it (sends of unused parameters go back before its step).
        optimizer = self.optimizers[0] if len(self.optimizers) == 1 else None
        if self.dgc_state is None:  # first fit: a fresh state from the LightningModule
            self.dgc_state = register(self.model, optimizer, self.dgc_config)
        else:  # a later fit with the same strategy keeps the residuals
            self.dgc_state = register(self.model, optimizer, state=self.dgc_state)
        if self._resume_state is not None:
            self.dgc_state.load_state_dict(self._resume_state)
            self._resume_state = None
            log.info("DGC state restored from the checkpoint (step %d)", self.dgc_state.step)
        self._logged_step = self.dgc_state.step

    def _check_precision(self) -> None:
        plugin = self.precision_plugin
        scaler = getattr(plugin, "scaler", None) if isinstance(plugin, MixedPrecision) else None
        if scaler is not None and self.dgc_config.nonfinite != "propagate":
            raise ValueError(
                f"Trainer(precision={plugin.precision!r}) scales the loss with a GradScaler, which "
                "skips steps whose gradients overflow; DGCConfig.nonfinite='raise' would raise "
                "instead. Use DGCConfig(nonfinite='propagate') (the step's sends go back into the "
                "residuals and the scaler skips it), or precision='bf16-mixed'."
            )

    # ------------------------------------------------------------------ traffic
    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.log_traffic:
            self._log_traffic()
        return output

    def _log_traffic(self) -> None:
        state = self.dgc_state
        if state is None or state.step == self._logged_step:
            return  # no communication step since the last log (e.g. a second optimizer)
        self._logged_step = state.step
        s = state.stats
        self.lightning_module.log_dict(
            {
                "dgc/bytes_sent": float(s.bytes_sent),
                "dgc/dense_bytes": float(s.dense_bytes),
                "dgc/compression_ratio": s.compression_ratio,
                "dgc/density": s.density,
                "dgc/achieved_density": s.achieved_density,
            },
            on_step=True,
            on_epoch=False,
        )

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Add every rank's DGC state to rank 0's checkpoint, then save it (called on every rank)."""
        if self.dgc_state is not None and "optimizer_states" in checkpoint:
            states = self._gather_states()
            if self.is_global_zero:
                checkpoint = {**checkpoint, CHECKPOINT_KEY: states}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _gather_states(self) -> list[dict[str, Any]]:
        assert self.dgc_state is not None
        mine = _to_cpu(self.dgc_state.state_dict())
        if not dist.is_available() or not dist.is_initialized():
            return [mine]
        gathered: list[Any] | None = [None] * dist.get_world_size() if self.is_global_zero else None
        dist.gather_object(mine, gathered, dst=0)
        return gathered if gathered is not None else []

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the checkpoint (every rank) and keep this rank's DGC state for the model setup."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        states = checkpoint.get(CHECKPOINT_KEY)
        if states is None:
            log.warning(
                "DGCStrategy: the checkpoint %s holds no DGC state; DGC starts with empty residuals.",
                checkpoint_path,
            )
            return checkpoint
        if len(states) != self.world_size:
            raise ValueError(
                f"The checkpoint holds the DGC state of {len(states)} ranks, this run has "
                f"{self.world_size}: residuals are per rank and cannot be redistributed. Resume with "
                f"{len(states)} processes, or delete checkpoint[{CHECKPOINT_KEY!r}] to restart DGC's "
                "memory (what the residuals held is then lost)."
            )
        self._resume_state = states[self.global_rank]
        if self.dgc_state is not None:  # checkpoint loaded after setup: apply it now
            self.dgc_state.load_state_dict(self._resume_state)
            self._resume_state = None
        return checkpoint
