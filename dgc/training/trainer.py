"""The training loop behind ``launch/train.py``: a :class:`Trainer`, read top to bottom.

    parts = Parts.build(cfg)       every component, validated, before any process group exists
    ctx = parts.runtime.init()     join the other processes (dgc.training.loop.train does both)
    Trainer(parts, ctx)            setup: model on the device, shards, optimizer, wrap, resume
      .run()                       epochs until train.epochs or train.max_steps, then .finish()
      .epoch()                     the steps of one epoch; a `step` record every logger.log_every
      .step(idx)                   forward (autocast), backward (communication), optimizer step
      .end_epoch()                 evaluation, `epoch` record, epoch checkpoint
      .save_checkpoint()           everything an exact continuation needs, saved
      .load_checkpoint()           ... and read back (+ .restore_checkpoint() after wrapping)
      .finish()                    final evaluation, `summary` record

Collectives, which every rank must reach in the same order, are marked ``# SYNC``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dgc.training.batches import ShardedBatches
from dgc.training.build import build, build_communication, build_runtime
from dgc.training.checkpoint import load_checkpoint, resume_source, save_checkpoint
from dgc.training.checks import check_pairing, check_resume
from dgc.training.clipping import LocalGradClip
from dgc.training.communication import Communication
from dgc.training.compiled import check_compile, compile_model, explain
from dgc.training.data import Data, Split
from dgc.training.dgc_communication import DGCCommunication
from dgc.training.faults import maybe_fail
from dgc.training.logger import MetricsLogger, progress
from dgc.training.metrics import TaskMeter, Traffic
from dgc.training.precision import Precision, check_communication, prepare_communication
from dgc.training.rng import get_rng_state, seed_everything, set_rng_state
from dgc.training.runtime import DistContext, Runtime
from dgc.training.schema import TrainConfig
from dgc.training.summary import RunDescription, format_banner, format_epoch

__all__ = ["Parts", "Position", "Trainer", "evaluate"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class Parts:
    """Every component the config names, built and checked before any process group starts."""

    cfg: DictConfig
    settings: TrainConfig
    comm: Communication
    runtime: Runtime
    metrics: MetricsLogger
    make_scheduler: Callable[..., Any]
    make_pruner: Callable[..., Any] | None
    make_monitor: Callable[..., Any] | None
    data: Data
    model: nn.Module

    @classmethod
    def build(cls, cfg: DictConfig) -> Parts:
        """Build and validate: a bad option fails here, alone, naming its key."""
        settings: TrainConfig = OmegaConf.to_object(cfg.train)  # type-checked, __post_init__ checks
        seed_everything(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's)
        comm = build_communication(cfg.get("compress"))
        runtime = build_runtime(cfg.dist)
        comm.check(dist_name=runtime.name, optim=cfg.optim)
        check_communication(comm, settings)
        if settings.compile:
            check_compile(settings.compile_backend)
        metrics = build(cfg.logger, "logger")
        make_scheduler = build(cfg.scheduler, "scheduler")
        build(cfg.optim, "optim")  # checks the optimizer's target and keys
        make_pruner = build(cfg.prune, "prune") if cfg.get("prune") is not None else None
        make_monitor = build(cfg.act, "act") if cfg.get("act") is not None else None
        data: Data = build(cfg.data, "data")
        model: nn.Module = build(cfg.model, "model")
        check_pairing(model, data)
        return cls(cfg=cfg, settings=settings, comm=comm, runtime=runtime, metrics=metrics,
                   make_scheduler=make_scheduler, make_pruner=make_pruner,
                   make_monitor=make_monitor, data=data, model=model)


@dataclass(kw_only=True, slots=True)
class Position:
    """Where training stands: what a checkpoint must restore for an exact continuation."""

    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` done
    step: int = 0  # optimizer steps done in total
    meter: TaskMeter = field(default_factory=TaskMeter)  # this epoch, this rank
    epoch_traffic: Traffic = field(default_factory=Traffic)
    run_traffic: Traffic = field(default_factory=Traffic)
    epoch_seconds: float = 0.0  # training time of this epoch so far (evaluation excluded)
    run_seconds: float = 0.0

    def rank_state(self) -> dict[str, Any]:
        return {"meter": self.meter.state_dict(), "epoch_traffic": self.epoch_traffic.state_dict(),
                "run_traffic": self.run_traffic.state_dict(), "epoch_seconds": self.epoch_seconds,
                "run_seconds": self.run_seconds}

    def load(self, common: dict[str, Any], mine: dict[str, Any]) -> None:
        self.epoch, self.batch, self.step = (int(common[k]) for k in ("epoch", "batch", "step"))
        self.meter = TaskMeter.from_state_dict(mine["meter"])
        self.epoch_traffic = Traffic.from_state_dict(mine["epoch_traffic"])
        self.run_traffic = Traffic.from_state_dict(mine["run_traffic"])
        self.epoch_seconds = float(mine["epoch_seconds"])
        self.run_seconds = float(mine["run_seconds"])


@dataclass(kw_only=True, slots=True)
class Saved:
    """A checkpoint read by :meth:`Trainer.load_checkpoint`: the part every rank shares, and this
    rank's."""

    common: dict[str, Any]
    mine: dict[str, Any]


class Trainer:
    """One training run on this rank (see the module docstring for the order of things)."""

    def __init__(self, parts: Parts, ctx: DistContext) -> None:
        self.cfg, self.settings, self.ctx = parts.cfg, parts.settings, ctx
        self.comm, self.runtime, self.metrics, self.data = (parts.comm, parts.runtime,
                                                            parts.metrics, parts.data)
        self._setup_process()  # SYNC: rank 0's output folders
        self._setup_model(parts)
        self._announce()  # the first console line: what runs
        self._setup_optimizer(parts)
        self.pos = Position()
        saved = self.load_checkpoint()  # weights before wrapping, so DDP broadcasts them
        self._wrap(parts)  # SYNC: rank 0's weights everywhere; the comm hook or Horovod optimizer
        self.restore_checkpoint(saved)
        self.last_saved = self.pos.step if saved is not None else -1
        self.last_eval: dict[str, float] | None = None
        self.last_stats: Any = None  # the last step's CompressionStats
        self.window = torch.zeros(2, dtype=torch.float64)  # summed loss, count since the last record
        self.window_traffic = Traffic()
        self.progress = progress(ctx.is_main and self.metrics.progress,
                                 self.metrics.progress_interval_s)

    # ------------------------------------------------------------------ setup
    def _setup_process(self) -> None:
        s, ctx = self.settings, self.ctx
        torch.set_num_threads(s.num_threads
                              or max(1, (os.cpu_count() or 1) // max(1, ctx.local_world_size)))
        if s.deterministic:
            torch.use_deterministic_algorithms(True)
        self.out_dir = Path(self.runtime.broadcast_object(s.out_dir if ctx.is_main else None))  # SYNC
        self.ckpt_dir = self.runtime.broadcast_object(s.checkpoint.dir if ctx.is_main else None)  # SYNC
        self.resume = resume_source(s.resume, self.ckpt_dir)  # "auto": the newest checkpoint, if any

    def _setup_model(self, parts: Parts) -> None:
        """Activation surgery first (it may replace modules, and everything after must see the
        final parameters), then the device, the data shards and the step counts."""
        s, ctx = self.settings, self.ctx
        self.model = parts.model
        self.monitor = parts.make_monitor(model=self.model) if parts.make_monitor else None
        self.model.to(ctx.device)
        self.train_split = self.data.train.to(ctx.device)
        self.test_split = self.data.test.to(ctx.device)
        self.batches = ShardedBatches(len(self.train_split), batch_size=s.batch_size, rank=ctx.rank,
                                      world_size=ctx.world_size, seed=self.cfg.seed)
        self.steps_per_epoch = len(self.batches)
        self.total_steps = s.epochs * self.steps_per_epoch  # what the schedules plan for
        self.max_steps = min(self.total_steps, s.max_steps or self.total_steps)
        self.comm.configure(steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps)

    def _announce(self) -> None:
        """Rank 0: the resolved config to ``<out_dir>/config.yaml``, one console line saying what
        runs; the metrics file opens."""
        s, ctx = self.settings, self.ctx
        config_file = self.out_dir / "config.yaml"
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            config_file.write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            log.info("%s", format_banner(RunDescription(
                model=type(self.model).__name__, parameters=self.n_params, data=self.data.name,
                train_samples=len(self.train_split), test_samples=len(self.test_split),
                compression=self.comm.describe(), world_size=ctx.world_size, backend=ctx.backend,
                device=ctx.device.type, precision=s.precision, compiled=s.compile,
                epochs=s.epochs, steps_per_epoch=self.steps_per_epoch, batch_size=s.batch_size,
                config_file=str(config_file))))
        self.metrics.open(self.out_dir, enabled=ctx.is_main,
                          config=OmegaConf.to_container(self.cfg, resolve=True),
                          append=self.resume is not None)  # a resumed run continues its metrics

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _setup_optimizer(self, parts: Parts) -> None:
        """Optimizer (shaped by the compress option), loss scaling and clipping hooks, pruner."""
        s, ctx = self.settings, self.ctx
        self.optimizer = self.comm.make_optimizer(self.model.parameters(), self.cfg.optim)
        self.precision = Precision(s, ctx.device)
        self.precision.attach(self.model)  # fp16: unscale before any other gradient hook
        if s.local_grad_clip is not None:
            LocalGradClip(self.model, s.local_grad_clip, ctx.world_size)
        if s.grad_clip is not None and isinstance(self.comm, DGCCommunication) \
                and self.comm.config.momentum > 0 and ctx.is_main:
            log.warning("train.grad_clip clips DGC's momentum-corrected average, not the gradient; "
                        "train.local_grad_clip or compress.config.clip_norm clip before compression")
        prepare_communication(self.comm, s)  # fp16 + DGC: nonfinite="propagate"
        self.pruner = (parts.make_pruner(model=self.model, total_steps=self.total_steps)
                       if parts.make_pruner else None)

    def _wrap(self, parts: Parts) -> None:
        """DDP + the comm hook, or Horovod's optimizer; the LR schedule; the pruner's hooks; compile."""
        self.wrapped, self.optimizer = self.runtime.wrap(self.model, self.optimizer, self.comm)  # SYNC
        self.scheduler = parts.make_scheduler(self.optimizer, total_steps=self.total_steps)
        if self.pruner is not None:
            self.pruner.attach_optimizer(self.optimizer)
            if self.comm.dgc_state is not None:
                self.pruner.attach_dgc(self.comm.dgc_state)
        self.forward_model = self.wrapped
        if self.settings.compile:
            self.forward_model = compile_model(self.wrapped, self.settings.compile_backend)

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint(self) -> Saved | None:
        """Resume, part 1 (``train.resume``): read this rank's checkpoint, check it fits this run,
        load the model weights (pruning masks included).  None on a fresh start."""
        if self.resume is None:
            return None
        common, mine = load_checkpoint(self.resume, rank=self.ctx.rank,
                                       world_size=self.ctx.world_size)
        check_resume(self.cfg, common, self.model, self.comm)
        self.model.load_state_dict(common["model"])
        return Saved(common=common, mine=mine)

    def restore_checkpoint(self, saved: Saved | None) -> None:
        """Resume, part 2 (after wrapping): optimizer, LR schedule, compression state, loss scale,
        random generators, position.  A fresh start seeds each rank's own dropout stream."""
        if saved is None:
            seed_everything(self.cfg.seed + 1 + self.ctx.rank)
            return
        common, mine = saved.common, saved.mine
        self.optimizer.load_state_dict(common["optimizer"])
        self.scheduler.load_state_dict(common["scheduler"])
        if "precision" in common:
            self.precision.load_state_dict(common["precision"])
        self.comm.load_state_dict(mine["comm"])
        set_rng_state(mine["rng"])
        self.pos.load(common, mine)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", self.resume,
                 self.pos.step, self.pos.epoch + 1, self.pos.batch)

    def checkpoint_state(self) -> Saved:
        """What a checkpoint holds: ``common`` (written by rank 0) and this rank's part."""
        opt_state = self.optimizer.state_dict()
        opt_state.pop("dgc", None)  # dgc.horovod's per-rank DGC state: saved by comm, per rank
        opt_state.pop("quant", None)  # dgc.quant.horovod's per-rank residuals: likewise
        common = {
            "epoch": self.pos.epoch, "batch": self.pos.batch, "world_size": self.ctx.world_size,
            "model": self.model.state_dict(), "optimizer": opt_state,
            "scheduler": self.scheduler.state_dict(), "comm": self.comm.name,
            "precision": self.precision.state_dict(),
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }
        mine = {"comm": self.comm.state_dict(), "rng": get_rng_state(), **self.pos.rank_state()}
        return Saved(common=common, mine=mine)

    def save_checkpoint(self) -> None:
        """SYNC: save a checkpoint of this step (nothing without ``train.checkpoint.dir``, or when
        this step is saved already)."""
        if self.ckpt_dir is None or self.last_saved == self.pos.step:
            return
        self.last_saved = self.pos.step
        state = self.checkpoint_state()
        save_checkpoint(self.ckpt_dir, self.pos.step, rank=self.ctx.rank, common=state.common,
                        per_rank=state.mine, barrier=self.runtime.barrier,
                        keep=self.settings.checkpoint.keep)

    # ------------------------------------------------------------------ training
    def run(self) -> dict[str, Any]:
        """Train until ``train.epochs`` or ``train.max_steps``; returns the ``summary`` record."""
        from torch._dynamo.exc import BackendCompilerFailed

        s, pos = self.settings, self.pos
        self.forward_model.train()
        try:
            while pos.epoch < s.epochs and pos.step < self.max_steps:
                self.epoch()
                if pos.batch < self.steps_per_epoch:  # stopped by train.max_steps inside the epoch
                    break
                self.end_epoch()
        except BackendCompilerFailed as e:  # only with train.compile=true
            raise explain(e, s.compile_backend) from e
        finally:
            self.progress.close()
        return self.finish()

    def epoch(self) -> None:
        """The remaining steps of epoch ``pos.epoch`` (all of them, unless resumed mid-epoch)."""
        s, pos = self.settings, self.pos
        self.progress.start(f"epoch {pos.epoch + 1}/{s.epochs}", self.steps_per_epoch, pos.batch)
        tic = time.perf_counter()
        for idx in self.batches.epoch(pos.epoch, start=pos.batch):
            self.step(idx)
            figures = self._log_step() if pos.step % self.metrics.log_every == 0 else {}  # SYNC
            self.progress.update(**figures)
            if s.checkpoint.every_steps and pos.step % s.checkpoint.every_steps == 0:
                tic = self._clock(tic)
                self.save_checkpoint()  # SYNC
            if pos.step >= self.max_steps:
                break
        self._clock(tic)

    def step(self, idx: Tensor) -> None:
        """One optimizer step on the training samples ``idx``."""
        if self.pruner is not None:
            self.pruner.step(self.pos.step)  # before the forward pass, with the steps done so far
        x, y = self.train_split.inputs[idx], self.train_split.targets[idx]
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            logits = self.forward_model(x)
            loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
        self.precision.backward(loss)  # SYNC: DDP averages the gradients here, via the comm hook
        self.precision.step(self.optimizer, self.model.parameters(), self.runtime,
                            grad_clip=self.settings.grad_clip)  # SYNC (Horovod: allreduces end here)
        self.scheduler.step()
        self.pos.step += 1
        self.pos.batch += 1
        self._account(loss, logits, y)
        maybe_fail(self.pos.step, self.ctx.rank)  # DGC_FAIL_AT_STEP: a simulated worker failure

    def _account(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        """The step's traffic, loss and accuracy into the running sums (this rank's share)."""
        stats = self.last_stats = self.comm.step_stats()
        for t in (self.pos.epoch_traffic, self.pos.run_traffic, self.window_traffic):
            t.add(stats)
        n = y.numel()
        loss_sum = float(loss.detach()) * n  # .item(): one sync per step, fine at this scale
        correct = int((logits.detach().argmax(-1) == y).sum())
        self.pos.meter.add(loss_sum, correct, n)
        self.window += torch.tensor([loss_sum, n], dtype=torch.float64)

    def _log_step(self) -> dict[str, str]:
        """A ``step`` record: the loss over every rank's samples since the last one.  Returns the
        figures for the progress line."""
        self.runtime.all_reduce_sum(self.window)  # SYNC
        record = {"event": "step", "step": self.pos.step, "epoch": self.pos.epoch + 1,
                  "loss": float(self.window[0] / self.window[1]),
                  "lr": self.optimizer.param_groups[0]["lr"], **self.window_traffic.summary()}
        if self.precision.loss_scale is not None:
            record["loss_scale"] = self.precision.loss_scale
        self.metrics.log(record)
        figures = {"loss": f"{record['loss']:.4f}",
                   "sent": f"{self.window_traffic.bytes_sent_per_step / 1e3:.1f}kB"}
        self.window.zero_()
        self.window_traffic = Traffic()
        return figures

    def _clock(self, tic: float) -> float:
        """Add the training time since ``tic`` to the epoch and run timers; returns now."""
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        now = time.perf_counter()
        self.pos.epoch_seconds += now - tic
        self.pos.run_seconds += now - tic
        return now

    def end_epoch(self) -> None:
        """Evaluate, write the ``epoch`` record and line, start the next epoch, checkpoint."""
        pos = self.pos
        self.last_eval = self._epoch_record()  # SYNC: the sums and the evaluation
        pos.epoch += 1
        pos.batch = 0
        pos.meter, pos.epoch_traffic, pos.epoch_seconds = TaskMeter(), Traffic(), 0.0
        every = self.settings.checkpoint.every_epochs
        if every and pos.epoch % every == 0:
            self.save_checkpoint()  # SYNC

    def _epoch_record(self) -> dict[str, float]:
        pos, ctx = self.pos, self.ctx
        sums = torch.tensor([pos.meter.loss_sum, pos.meter.correct, pos.meter.count],
                            dtype=torch.float64)
        self.runtime.all_reduce_sum(sums)  # SYNC
        train_meter = TaskMeter(loss_sum=float(sums[0]), correct=int(sums[1]), count=int(sums[2]))
        test = self.evaluate()  # SYNC
        record = {
            "event": "epoch", "epoch": pos.epoch + 1, "step": pos.step,
            **{f"train_{k}": v for k, v in train_meter.result(self.data.language_model).items()},
            **{f"test_{k}": v for k, v in test.items()},
            "step_time_s": pos.epoch_seconds / max(1, pos.epoch_traffic.steps),
            "samples_per_s": pos.meter.count * ctx.world_size / max(pos.epoch_seconds, 1e-9),
            "lr": self.optimizer.param_groups[0]["lr"],
            **pos.epoch_traffic.summary(),
        }
        self.metrics.log(record)
        if ctx.is_main:
            log.info("%s", format_epoch(record, self.settings.epochs))
        return test

    def evaluate(self) -> dict[str, float]:
        """SYNC: the test split, under the training's autocast."""
        with self.precision.autocast():
            return evaluate(self.model, self.test_split, batch_size=self.settings.eval_batch_size,
                            runtime=self.runtime, ctx=self.ctx,
                            language_model=self.data.language_model)

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict[str, Any]:
        """Final evaluation (unless the last epoch's is current), checkpoint, ``summary`` record."""
        pos, ctx = self.pos, self.ctx
        if self.last_eval is None or pos.batch:
            self.last_eval = self.evaluate()  # SYNC
        if self.settings.checkpoint.at_end:
            self.save_checkpoint()  # SYNC
        summary = {
            "event": "summary", "step": pos.step,
            "epochs_done": pos.epoch + pos.batch / self.steps_per_epoch,
            "world_size": ctx.world_size, "backend": ctx.backend, "device": ctx.device.type,
            "precision": self.settings.precision, "compiled": self.settings.compile,
            "model": type(self.model).__name__, "parameters": self.n_params, "data": self.data.name,
            "compress": self.comm.name, "compression": self.comm.describe(),
            **{f"test_{k}": v for k, v in self.last_eval.items()},
            "step_time_s": pos.run_seconds / max(1, pos.run_traffic.steps),
            "train_seconds": pos.run_seconds,
            **pos.run_traffic.summary(),
            "out_dir": str(self.out_dir),
        }
        if self.precision.loss_scale is not None:
            summary.update(loss_scale=self.precision.loss_scale,
                           skipped_steps=self.precision.skipped_steps)
        if self.last_stats is not None:  # the last step: DGC's steady state after the warm-up
            summary.update(last_step_bytes_sent=self.last_stats.bytes_sent,
                           last_step_compression_ratio=self.last_stats.compression_ratio,
                           last_step_density=self.last_stats.achieved_density)
        if ctx.is_main and (self.pruner is not None or self.monitor is not None):
            summary["sparsity_report"] = self._sparsity_report()
        self.metrics.log(summary)
        return summary

    def _sparsity_report(self) -> str:
        from dgc.sparsity_report import sparsity_report

        report = sparsity_report(self.wrapped, self.monitor, self.comm.dgc_state)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "sparsity.md").write_text(report.to_markdown())
        (self.out_dir / "sparsity.json").write_text(report.to_json(indent=2))
        log.info("sparsity report (%s):\n%s", self.out_dir / "sparsity.md", report.to_markdown())
        return str(self.out_dir / "sparsity.md")


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, *, batch_size: int, runtime: Runtime,
             ctx: DistContext, language_model: bool) -> dict[str, float]:
    """Loss, accuracy (and perplexity) on ``split``; each rank takes every world_size-th sample,
    so every sample counts exactly once.  ``model`` is the unwrapped module: DDP's forward could
    start collectives, and the ranks run different numbers of evaluation batches."""
    was_training = model.training
    model.eval()
    mine = torch.arange(ctx.rank, len(split), ctx.world_size, device=split.targets.device)
    sums = torch.zeros(3, dtype=torch.float64)
    for chunk in mine.split(batch_size):
        x, y = split.inputs[chunk], split.targets[chunk]
        logits = model(x).flatten(0, -2)
        sums[0] += float(F.cross_entropy(logits.float(), y.flatten(), reduction="sum"))
        sums[1] += int((logits.argmax(-1) == y.flatten()).sum())
        sums[2] += y.numel()
    runtime.all_reduce_sum(sums)  # SYNC
    model.train(was_training)
    meter = TaskMeter(loss_sum=float(sums[0]), correct=int(sums[1]), count=int(sums[2]))
    return meter.result(language_model)
