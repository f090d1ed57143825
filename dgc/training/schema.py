"""The structured schema of the launcher's configuration, registered in Hydra's ConfigStore.

``conf/config.yaml`` extends ``config_schema`` (:class:`Config`), so every key of ``train`` is
type-checked and an unknown key (``train.epocs=3``) fails at composition.  The component groups
(``model``, ``data``, ``optim``, ``scheduler``, ``logger``, ``dist``, ``compress``, ``prune``, ``act``)
are ``_target_`` nodes: their fields are the keyword arguments of the class or builder they name,
documented there, checked when they are built (before any process group starts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

__all__ = ["PRECISIONS", "CheckpointConfig", "Config", "TrainConfig", "register_configs"]

PRECISIONS = ("32", "bf16", "fp16")
"""The values of ``train.precision``."""


def _int_at_least(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """When and where checkpoints are written (see :mod:`dgc.training.checkpoint`)."""

    dir: str | None = None
    """Root folder of the checkpoints; None = no checkpoints.  conf/config.yaml sets
    ``${train.out_dir}/checkpoints``."""
    every_epochs: int = 1
    """Save after every this many epochs (after the evaluation); 0 = off."""
    every_steps: int = 0
    """Save every this many optimizer steps; 0 = off."""
    at_end: bool = True
    """Save when the run ends (all epochs done or ``train.max_steps`` reached)."""
    keep: int | None = 2
    """Newest checkpoint folders kept; None = keep all."""

    def __post_init__(self) -> None:
        for name in ("every_epochs", "every_steps"):
            if not _int_at_least(getattr(self, name), 0):
                raise ValueError(f"train.checkpoint.{name} = {getattr(self, name)!r} is invalid: it "
                                 "must be an integer >= 0 (0 = off).")
        if self.keep is not None and not _int_at_least(self.keep, 1):
            raise ValueError(f"train.checkpoint.keep = {self.keep!r} is invalid: it must be >= 1, "
                             "or null to keep every checkpoint.")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The training loop's own settings (``train.*``)."""

    epochs: int = 5
    """Passes over the training split.  Also the length the LR schedule and the pruning schedule
    plan for."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total, counted from the start of training (a resumed
    run stops at the same step as an uninterrupted one); None = run all ``epochs``.  A cap only: it
    changes no schedule."""
    batch_size: int = 64
    """Samples per step *per rank* (the global batch is ``batch_size * world_size``)."""
    eval_batch_size: int = 1000
    """Samples per forward pass during evaluation."""
    grad_clip: float | None = None
    """Clip the averaged gradient to this global L2 norm before the optimizer step; None = off.
    With ``compress=dgc`` that "gradient" is already a momentum accumulation: prefer
    ``local_grad_clip``."""
    local_grad_clip: float | None = None
    """Clip each parameter's *local* gradient to L2 norm ``local_grad_clip / sqrt(world_size)``
    before communication (the DGC paper's local clipping), identically for every compress option;
    None = off.  (``compress.config.clip_norm`` does the same inside DGC: use one of them.)"""
    out_dir: str = "outputs/run"
    """Folder of the metrics JSONL, checkpoints and reports.  conf/config.yaml sets Hydra's run
    folder; the ranks use rank 0's value."""
    resume: str | None = None
    """Continue from this checkpoint folder (or a checkpoint root: its ``latest``); None = start
    fresh.  Needs the same world size, model and compress option."""
    num_threads: int | None = None
    """torch CPU threads per rank; None = CPU cores / ranks on this machine (at least 1)."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)`` (slower on GPUs)."""
    precision: str = "32"
    """Arithmetic of the forward pass: "32" (float32), "bf16" (``torch.autocast`` with bfloat16 on
    the model's device: CPUs too) or "fp16" (autocast with float16 plus loss scaling by
    ``torch.amp.GradScaler``; a step whose gradients overflow is skipped, and ``compress=dgc`` then
    runs with ``nonfinite="propagate"`` so the skipped step keeps every residual).  Parameters,
    gradients, optimizer and compression state stay float32 in every mode."""
    loss_scale: float = 65536.0
    """fp16 only: GradScaler's initial loss scale (``init_scale``); halved after every skipped step,
    doubled after ``loss_scale_growth_interval`` good steps in a row."""
    loss_scale_growth_interval: int = 2000
    """fp16 only: good steps in a row before GradScaler doubles the loss scale."""
    compile: bool = False
    """``torch.compile`` the wrapped (DDP) model; the comm hook runs as in eager mode."""
    compile_backend: str = "inductor"
    """``torch.compile``'s backend (``torch._dynamo.list_backends()``): "inductor" (generates
    kernels; on CPUs it needs a C++ compiler), "aot_eager" (traces, no code generation), ..."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint policy."""

    def __post_init__(self) -> None:
        for name, low in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1)):
            if not _int_at_least(getattr(self, name), low):
                raise ValueError(f"train.{name} = {getattr(self, name)!r} is invalid: it must be an "
                                 f"integer >= {low}.")
        if self.max_steps is not None and not _int_at_least(self.max_steps, 1):
            raise ValueError(f"train.max_steps = {self.max_steps!r} is invalid: it must be an "
                             "integer >= 1, or null to run every epoch.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"train.grad_clip = {self.grad_clip!r} is invalid: it must be > 0, or "
                             "null for no clipping.")
        if self.local_grad_clip is not None and not self.local_grad_clip > 0:
            raise ValueError(f"train.local_grad_clip = {self.local_grad_clip!r} is invalid: it "
                             "must be > 0, or null for no clipping.")
        if self.num_threads is not None and not _int_at_least(self.num_threads, 1):
            raise ValueError(f"train.num_threads = {self.num_threads!r} is invalid: it must be >= 1, "
                             "or null for cores / ranks.")
        self._check_precision()

    def _check_precision(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision = {self.precision!r} is invalid: use 32, bf16 or fp16 "
                             "(e.g. train.precision=bf16).")
        if not (isinstance(self.loss_scale, int | float) and 1.0 <= self.loss_scale < float("inf")):
            raise ValueError(f"train.loss_scale = {self.loss_scale!r} is invalid: it must be a finite "
                             "number >= 1 (GradScaler's initial scale, default 65536).")
        if not _int_at_least(self.loss_scale_growth_interval, 1):
            raise ValueError(f"train.loss_scale_growth_interval = {self.loss_scale_growth_interval!r} "
                             "is invalid: it must be an integer >= 1.")
        if self.compile:
            import torch._dynamo

            known = set(torch._dynamo.list_backends(exclude_tags=())) | {"inductor", "eager"}
            if self.compile_backend not in known:
                raise ValueError(f"train.compile_backend = {self.compile_backend!r} is invalid: use "
                                 f"one of {', '.join(sorted(known))} (torch._dynamo.list_backends()).")


@dataclass(kw_only=True, slots=True)
class Config:
    """The whole configuration (``conf/config.yaml``)."""

    seed: int = 0
    """Seeds the model initialization, the data order (``DistributedSampler``) and, offset by the
    rank, each rank's dropout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop settings."""
    model: Any = None
    """``model`` group: a ``_target_`` node building an ``nn.Module``."""
    data: Any = None
    """``data`` group: a ``_target_`` node building a :class:`dgc.training.data.Data`."""
    optim: Any = None
    """``optim`` group: a ``_partial_`` optimizer (``torch.optim.SGD``, ...)."""
    scheduler: Any = None
    """``scheduler`` group: a ``_partial_`` LR schedule from :mod:`dgc.training.schedule`."""
    logger: Any = None
    """``logger`` group: :class:`dgc.training.logger.MetricsLogger`."""
    dist: Any = None
    """``dist`` group: :class:`~dgc.training.runtime.DDPRuntime` or
    :class:`~dgc.training.horovod_runtime.HorovodRuntime`."""
    compress: Any = None
    """Optional group (``+compress=dgc|topk|fp16|powersgd``); None = DDP's plain allreduce."""
    prune: Any = None
    """Optional group (``+prune=...``): ``dgc.pruning.build_pruner``; None = no pruning."""
    act: Any = None
    """Optional group (``+act=...``): ``dgc.activation.build_activation``; None = untouched."""


def register_configs() -> None:
    """Register :class:`Config` as ``config_schema`` (idempotent)."""
    ConfigStore.instance().store(name="config_schema", node=Config)
