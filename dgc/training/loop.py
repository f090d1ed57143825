"""The training loop behind ``launch/train.py``, readable top to bottom.

1. Build and validate every part of the config (model, data, optimizer, compression, pruning,
   logger) *before* any process group starts, so a bad option fails fast and alone.
2. Join the other processes (``dist``), wrap the model (DDP + the ``compress`` hook, or Horovod),
   restore a checkpoint when ``train.resume`` is set.
3. Train epoch by epoch; every ``logger.log_every`` steps a ``step`` record, after every epoch an
   evaluation and an ``epoch`` record, at the end a ``summary`` record (returned).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dgc.training.batches import ShardedBatches
from dgc.training.build import build, build_communication
from dgc.training.checkpoint import load_checkpoint, save_checkpoint
from dgc.training.clipping import LocalGradClip
from dgc.training.communication import Communication
from dgc.training.data import Data, Split
from dgc.training.metrics import TaskMeter, Traffic
from dgc.training.rng import get_rng_state, seed_everything, set_rng_state
from dgc.training.schema import TrainConfig
from dgc.training.summary import format_epoch

__all__ = ["train"]

log = logging.getLogger(__name__)

# Keys that may differ between a run and the run it resumes (everything else draws a warning).
_RESUME_MAY_DIFFER = ("train.resume", "train.max_steps", "train.out_dir", "train.checkpoint",
                      "train.num_threads", "logger", "hydra")


@dataclass(kw_only=True, slots=True)
class _Position:
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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the ``summary`` record (on every rank)."""
    # ---- 1. Everything that needs no other process, validated now.
    settings: TrainConfig = OmegaConf.to_object(cfg.train)  # type-checked, __post_init__ validates
    seed_everything(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    comm = build_communication(cfg.get("compress"))
    runtime = build(cfg.dist, "dist")
    comm.check(dist_name=runtime.name, optim=cfg.optim)
    metrics = build(cfg.logger, "logger")
    make_scheduler = build(cfg.scheduler, "scheduler")
    build(cfg.optim, "optim")  # checks the optimizer's target and keys
    make_pruner = build(cfg.prune, "prune") if cfg.get("prune") is not None else None
    make_monitor = build(cfg.act, "act") if cfg.get("act") is not None else None
    data: Data = build(cfg.data, "data")
    model: nn.Module = build(cfg.model, "model")
    _check_pairing(model, data)

    # ---- 2. Join the other processes.
    ctx = runtime.init()
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        result = _run(cfg, settings, runtime, ctx, comm, metrics, make_scheduler, make_pruner,
                      make_monitor, data, model)
        # No rank tears the group down while another still finishes its last collective (gloo then
        # aborts that rank at exit: "terminate called without an active exception").  Only on
        # success: after a failure on one rank a barrier would wait for it forever.
        runtime.barrier()
        return result
    finally:
        metrics.close()
        runtime.shutdown()


def _run(cfg, settings, runtime, ctx, comm: Communication, metrics, make_scheduler, make_pruner,
         make_monitor, data: Data, model: nn.Module) -> dict[str, Any]:
    torch.set_num_threads(settings.num_threads
                          or max(1, (os.cpu_count() or 1) // max(1, ctx.local_world_size)))
    if settings.deterministic:
        torch.use_deterministic_algorithms(True)
    out_dir = Path(runtime.broadcast_object(settings.out_dir if ctx.is_main else None))
    ckpt = settings.checkpoint
    ckpt_dir = runtime.broadcast_object(ckpt.dir if ctx.is_main else None)

    # ---- Model, data, optimizer, schedules.  Activation surgery comes first: it may replace
    # modules, and the optimizer must see the final parameters.
    monitor = make_monitor(model=model) if make_monitor else None
    model.to(ctx.device)
    train_split, test_split = data.train.to(ctx.device), data.test.to(ctx.device)
    batches = ShardedBatches(len(train_split), batch_size=settings.batch_size, rank=ctx.rank,
                             world_size=ctx.world_size, seed=cfg.seed)
    steps_per_epoch = len(batches)
    total_steps = settings.epochs * steps_per_epoch  # what the schedules plan for
    max_steps = min(total_steps, settings.max_steps or total_steps)
    comm.configure(steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    optimizer = comm.make_optimizer(model.parameters(), cfg.optim)
    if settings.local_grad_clip is not None:
        LocalGradClip(model, settings.local_grad_clip, ctx.world_size)
    if settings.grad_clip is not None and getattr(comm, "config", None) is not None \
            and comm.config.momentum > 0 and ctx.is_main:
        log.warning("train.grad_clip clips DGC's momentum-corrected average, not the gradient; "
                    "train.local_grad_clip or compress.config.clip_norm clip before compression")
    pruner = make_pruner(model=model, total_steps=total_steps) if make_pruner else None

    # ---- Resume, part 1: weights (masks included) before wrapping, so DDP broadcasts them.
    pos = _Position()
    common = mine = None
    if settings.resume:
        common, mine = load_checkpoint(settings.resume, rank=ctx.rank, world_size=ctx.world_size)
        _check_resume(cfg, common, model, comm)
        model.load_state_dict(common["model"])

    # ---- Wrap: DDP + the comm hook, or Horovod's optimizer.
    wrapped, optimizer = runtime.wrap(model, optimizer, comm)
    scheduler = make_scheduler(optimizer, total_steps=total_steps)
    if pruner is not None:
        pruner.attach_optimizer(optimizer)
        if comm.dgc_state is not None:
            pruner.attach_dgc(comm.dgc_state)

    # ---- Resume, part 2: optimizer, schedule, compression state, RNG, position.
    if common is not None and mine is not None:
        optimizer.load_state_dict(common["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
        comm.load_state_dict(mine["comm"])
        set_rng_state(mine["rng"])
        pos.load(common, mine)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", settings.resume, pos.step,
                 pos.epoch + 1, pos.batch)
    else:
        seed_everything(cfg.seed + 1 + ctx.rank)  # each rank its own dropout stream

    n_params = sum(p.numel() for p in model.parameters())
    if ctx.is_main:
        log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
        log.info("%s (%d parameters) on %s (%d train / %d test), %d ranks (%s, %s), %d steps per "
                 "epoch, batch %d per rank; gradients: %s", type(model).__name__, n_params,
                 data.name, len(train_split), len(test_split), ctx.world_size, ctx.backend,
                 ctx.device.type, steps_per_epoch, settings.batch_size, comm.describe())
    metrics.open(out_dir, enabled=ctx.is_main, config=OmegaConf.to_container(cfg, resolve=True),
                 append=False)

    def checkpoint() -> None:
        nonlocal last_saved
        if ckpt_dir is None or last_saved == pos.step:
            return
        last_saved = pos.step
        opt_state = optimizer.state_dict()
        opt_state.pop("dgc", None)  # dgc.horovod's per-rank DGC state: saved by comm, per rank
        common_state = {
            "epoch": pos.epoch, "batch": pos.batch, "world_size": ctx.world_size,
            "model": _unwrap(wrapped).state_dict(), "optimizer": opt_state,
            "scheduler": scheduler.state_dict(), "comm": comm.name,
            "config": OmegaConf.to_yaml(cfg, resolve=True),
        }
        save_checkpoint(ckpt_dir, pos.step, rank=ctx.rank, common=common_state,
                        per_rank={"comm": comm.state_dict(), "rng": get_rng_state(),
                                  **pos.rank_state()},
                        barrier=runtime.barrier, keep=ckpt.keep)

    last_saved = pos.step if settings.resume else -1
    last_eval: dict[str, float] | None = None
    window = torch.zeros(2, dtype=torch.float64)  # summed loss, count since the last step record
    window_traffic = Traffic()
    bar = _progress_bar(ctx.is_main and metrics.progress, steps_per_epoch)
    logging_around_bar = contextlib.ExitStack()
    if ctx.is_main and metrics.progress:  # log lines above the bar, not through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        logging_around_bar.enter_context(logging_redirect_tqdm())
    last_stats = None

    # ---- 3. Train.
    wrapped.train()
    while pos.epoch < settings.epochs and pos.step < max_steps:
        bar.reset(total=steps_per_epoch)
        bar.update(pos.batch)
        bar.set_description(f"epoch {pos.epoch + 1}/{settings.epochs}")
        tic = time.perf_counter()
        for idx in batches.epoch(pos.epoch, start=pos.batch):
            if pruner is not None:
                pruner.step(pos.step)  # before the forward pass, with the steps done so far
            x, y = train_split.inputs[idx], train_split.targets[idx]
            optimizer.zero_grad(set_to_none=True)
            logits = wrapped(x)
            loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
            loss.backward()  # DDP averages the gradients here, bucket by bucket, via the hook
            _step(optimizer, runtime, wrapped, settings.grad_clip)
            scheduler.step()
            pos.step += 1
            pos.batch += 1

            stats = last_stats = comm.step_stats()
            for t in (pos.epoch_traffic, pos.run_traffic, window_traffic):
                t.add(stats)
            n = y.numel()
            loss_sum = float(loss.detach()) * n  # .item(): one sync per step, fine at this scale
            pos.meter.add(loss_sum, int((logits.detach().argmax(-1) == y).sum()), n)
            window += torch.tensor([loss_sum, n], dtype=torch.float64)
            bar.update(1)

            if pos.step % metrics.log_every == 0:
                runtime.all_reduce_sum(window)  # mean loss over every rank's samples
                record = {"event": "step", "step": pos.step, "epoch": pos.epoch + 1,
                          "loss": float(window[0] / window[1]),
                          "lr": optimizer.param_groups[0]["lr"], **window_traffic.summary()}
                metrics.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}",
                                sent=f"{window_traffic.bytes_sent_per_step / 1e3:.1f}kB")
                window.zero_()
                window_traffic = Traffic()
            if ckpt.every_steps and pos.step % ckpt.every_steps == 0:
                _time_into(pos, tic, ctx)
                tic = time.perf_counter()
                checkpoint()
            if pos.step >= max_steps:
                break
        _time_into(pos, tic, ctx)

        if pos.batch < steps_per_epoch:  # stopped by train.max_steps inside the epoch
            break
        # ---- End of epoch: evaluate, report, checkpoint.
        last_eval = _epoch_end(pos, settings, runtime, ctx, metrics, wrapped, test_split, data,
                               optimizer)
        pos.epoch += 1
        pos.batch = 0
        pos.meter, pos.epoch_traffic, pos.epoch_seconds = TaskMeter(), Traffic(), 0.0
        if ckpt.every_epochs and pos.epoch % ckpt.every_epochs == 0:
            checkpoint()
    bar.close()
    logging_around_bar.close()

    # ---- The end: final evaluation (unless the last epoch's is current), summary, reports.
    if last_eval is None or pos.batch:
        last_eval = evaluate(_unwrap(wrapped), test_split, settings.eval_batch_size, runtime, ctx,
                             data.language_model)
    if ckpt.at_end:
        checkpoint()
    summary = {
        "event": "summary", "step": pos.step, "epochs_done": pos.epoch + pos.batch / steps_per_epoch,
        "world_size": ctx.world_size, "backend": ctx.backend, "device": ctx.device.type,
        "model": type(_unwrap(wrapped)).__name__, "parameters": n_params, "data": data.name,
        "compress": comm.name, "compression": comm.describe(),
        **{f"test_{k}": v for k, v in last_eval.items()},
        "step_time_s": pos.run_seconds / max(1, pos.run_traffic.steps),
        "train_seconds": pos.run_seconds,
        **pos.run_traffic.summary(),
        "out_dir": str(out_dir),
    }
    if last_stats is not None:  # the last step: DGC's steady state once the warm-up is over
        summary.update(last_step_bytes_sent=last_stats.bytes_sent,
                       last_step_compression_ratio=last_stats.compression_ratio,
                       last_step_density=last_stats.achieved_density)
    if ctx.is_main and (pruner is not None or monitor is not None):
        summary["sparsity_report"] = _sparsity_report(wrapped, monitor, comm, out_dir)
    metrics.log(summary)
    return summary


def _step(optimizer: torch.optim.Optimizer, runtime: Any, model: nn.Module,
          grad_clip: float | None) -> None:
    """The optimizer step, with optional clipping of the averaged gradient."""
    if grad_clip is None:
        optimizer.step()
        return
    sync = getattr(optimizer, "synchronize", None)  # Horovod: finish the allreduce first
    if sync is not None:
        sync()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    skip = getattr(optimizer, "skip_synchronize", None)
    with skip() if skip is not None else contextlib.nullcontext():
        optimizer.step()


def _time_into(pos: _Position, tic: float, ctx: Any) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    dt = time.perf_counter() - tic
    pos.epoch_seconds += dt
    pos.run_seconds += dt


def _epoch_end(pos: _Position, settings: TrainConfig, runtime: Any, ctx: Any, metrics: Any,
               wrapped: nn.Module, test_split: Split, data: Data,
               optimizer: torch.optim.Optimizer) -> dict[str, float]:
    sums = torch.tensor([pos.meter.loss_sum, pos.meter.correct, pos.meter.count], dtype=torch.float64)
    runtime.all_reduce_sum(sums)
    train_meter = TaskMeter(loss_sum=float(sums[0]), correct=int(sums[1]), count=int(sums[2]))
    test = evaluate(_unwrap(wrapped), test_split, settings.eval_batch_size, runtime, ctx,
                    data.language_model)
    steps = max(1, pos.epoch_traffic.steps)
    record = {
        "event": "epoch", "epoch": pos.epoch + 1, "step": pos.step,
        **{f"train_{k}": v for k, v in train_meter.result(data.language_model).items()},
        **{f"test_{k}": v for k, v in test.items()},
        "step_time_s": pos.epoch_seconds / steps,
        "samples_per_s": pos.meter.count * ctx.world_size / max(pos.epoch_seconds, 1e-9),
        "lr": optimizer.param_groups[0]["lr"],
        **pos.epoch_traffic.summary(),
    }
    metrics.log(record)
    if ctx.is_main:
        log.info("%s", format_epoch(record, settings.epochs))
    return test


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int, runtime: Any, ctx: Any,
             language_model: bool) -> dict[str, float]:
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
        sums[0] += float(F.cross_entropy(logits, y.flatten(), reduction="sum"))
        sums[1] += int((logits.argmax(-1) == y.flatten()).sum())
        sums[2] += y.numel()
    runtime.all_reduce_sum(sums)
    model.train(was_training)
    meter = TaskMeter(loss_sum=float(sums[0]), correct=int(sums[1]), count=int(sums[2]))
    return meter.result(language_model)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _check_pairing(model: nn.Module, data: Data) -> None:
    """One forward pass on two training samples: a model/data mismatch fails here, clearly."""
    x = data.train.inputs[:2]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(x)
            model.train(was)
    except Exception as e:
        raise ValueError(f"model {type(model).__name__} cannot take the inputs of data "
                         f"{data.name} (shape {tuple(x.shape)}, {x.dtype}): {e}. Pick a matching "
                         "pair, e.g. experiment=char_lstm, or model=cnn data=digits.") from e
    classes = int(data.train.targets.max()) + 1
    if out.shape[:-1] != data.train.targets[:2].shape or out.shape[-1] < classes:
        raise ValueError(f"model {type(model).__name__} outputs shape {tuple(out.shape)} for "
                         f"targets of shape {tuple(data.train.targets[:2].shape)} with {classes} "
                         "classes: check model.num_classes / model.vocab_size.")


def _check_resume(cfg: DictConfig, common: dict[str, Any], model: nn.Module,
                  comm: Communication) -> None:
    saved = {k: tuple(v.shape) for k, v in common["model"].items()}
    live = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if saved != live:
        diff = sorted(k for k in saved.keys() | live.keys() if saved.get(k) != live.get(k))
        raise ValueError(
            "train.resume: the checkpoint holds another model (differs in "
            f"{', '.join(f'{k}: {saved.get(k)} vs {live.get(k)}' for k in diff[:4])}). Resume with "
            "the model (and prune/act) config the checkpoint was written with."
        )
    if common["comm"] != comm.name:
        raise ValueError(
            f"train.resume: the checkpoint was written with compress={common['comm']} and this "
            f"run has compress={comm.name}; resume with the same +compress option."
        )
    before = _flatten(OmegaConf.to_container(OmegaConf.create(common["config"])))
    now = _flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k) != now.get(k) and not k.startswith(_RESUME_MAY_DIFFER))
    if changed:
        log.warning("train.resume: these settings differ from the checkpoint's run, so the "
                    "continuation is not exact: %s", ", ".join(changed))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, dynamic_ncols=True, leave=False)


class _NoBar:
    def reset(self, total: int) -> None: ...
    def update(self, n: int) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _sparsity_report(model: nn.Module, monitor: Any, comm: Communication, out_dir: Path) -> str:
    from dgc.sparsity_report import sparsity_report

    report = sparsity_report(model, monitor, comm.dgc_state)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sparsity.md").write_text(report.to_markdown())
    (out_dir / "sparsity.json").write_text(report.to_json(indent=2))
    log.info("sparsity report (%s):\n%s", out_dir / "sparsity.md", report.to_markdown())
    return str(out_dir / "sparsity.md")
