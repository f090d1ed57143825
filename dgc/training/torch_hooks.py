"""``compress=fp16`` and ``compress=powersgd``: PyTorch's own DDP hooks, for comparison.

Both are wrapped in a small counting hook that records the payload of every bucket (PyTorch's
hooks do not report bytes), so the summary compares like with like:

- fp16: every element travels as a 2-byte float (``default_hooks.fp16_compress_hook``).
- PowerSGD (``powerSGD_hook``, Vogels et al. 2019): vanilla allreduce for the first
  ``start_powerSGD_iter`` steps, then per matrix the factors P (n x r) and Q (m x r), with vectors
  and matrices not worth compressing sent whole.  The count is PowerSGD's own element tally
  (``total_numel_after_compression``) times the element size.
"""

# No `from __future__ import annotations`: DDP inspects the hook's annotations at runtime.

import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

from dgc.stats import CompressionStats
from dgc.training.communication import Communication, dense_stats

__all__ = ["FP16Compression", "PowerSGD"]

log = logging.getLogger(__name__)


class _Counter:
    """Per-step traffic of a wrapped hook: buckets add, the last bucket publishes."""

    def __init__(self) -> None:
        self.pending = CompressionStats()
        self.last = CompressionStats()
        self.step = 0

    def add(self, bucket: dist.GradBucket, *, sent: int, elements_sent: int, dense_path: bool) -> None:
        buf = bucket.buffer()
        dense = buf.numel() * buf.element_size()
        self.pending.add(sent=sent, received=sent, dense=dense, elements=buf.numel(),
                         elements_sent=elements_sent)
        if dense_path:
            self.pending.dense_buckets += 1
        else:
            self.pending.sparse_buckets += 1
        if bucket.is_last():
            self.pending.step = self.step
            self.pending.density = self.pending.achieved_density
            self.last, self.pending = self.pending, CompressionStats()
            self.step += 1


class FP16Compression(Communication):
    """``compress=fp16``: gradients cast to float16 for the allreduce (2x fewer bytes).

    Under ``dist=horovod`` this is ``hvd.Compression.fp16``.
    """

    name = "fp16"

    def __init__(self) -> None:
        self._counter = _Counter()
        self._static: CompressionStats | None = None

    def attach_ddp(self, ddp_model: nn.parallel.DistributedDataParallel,
                   optimizer: torch.optim.Optimizer) -> None:
        ddp_model.register_comm_hook(self, _fp16_hook)

    def wrap_horovod(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        import horovod.torch as hvd

        self._static = dense_stats(model, bytes_per_element=2)
        return hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                        compression=hvd.Compression.fp16)

    def step_stats(self) -> CompressionStats:
        return self._static if self._static is not None else self._counter.last

    def describe(self) -> str:
        return "fp16 allreduce (PyTorch fp16_compress_hook)"


def _fp16_hook(state: FP16Compression, bucket):
    buf = bucket.buffer()
    state._counter.add(bucket, sent=buf.numel() * 2, elements_sent=buf.numel(), dense_path=True)
    return default_hooks.fp16_compress_hook(None, bucket)


class PowerSGD(Communication):
    """``compress=powersgd``: PyTorch's ``PowerSGDState`` + ``powerSGD_hook``.

    Args:
        matrix_approximation_rank: rank r of the factors (PyTorch's default 1; 2-4 is common).
        start_powerSGD_iter: steps of vanilla allreduce before compression starts (>= 2 with error
            feedback or warm start).
        min_compression_rate: a matrix is compressed only if it shrinks at least this much.
        use_error_feedback: keep the compression error locally and add it next step.
        warm_start: reuse last step's factors as the starting point of the power iteration.
        orthogonalization_epsilon: added in the Gram-Schmidt division (0 = exact).
        random_seed: seed of the random initial Q.
        bucket_cap_mb: DDP bucket size for this hook.  PyTorch's hook issues its second
            allreduce from a ``Future.then`` callback, and on gloo the callbacks of several buckets
            then run in different orders on different ranks and pair the wrong messages
            ("Received data size doesn't match expected size", docs/algorithm.md#collectives-from-the-hook-call);
            one big bucket avoids it.
            None = the ``dist`` config's ``bucket_cap_mb``.

    Checkpoints keep the iteration counter, the random state and, per bucket, the error-feedback
    and warm-start memories; they are restored when DDP's buckets after the restart have the same
    sizes (one bucket: always), else reset with a warning.
    """

    name = "powersgd"

    def __init__(self, *, matrix_approximation_rank: int = 1, start_powerSGD_iter: int = 10,
                 min_compression_rate: float = 2.0, use_error_feedback: bool = True,
                 warm_start: bool = True, orthogonalization_epsilon: float = 0.0,
                 random_seed: int = 0, bucket_cap_mb: float | None = 1024.0) -> None:
        if isinstance(matrix_approximation_rank, bool) or matrix_approximation_rank < 1:
            raise ValueError(f"compress.matrix_approximation_rank = {matrix_approximation_rank!r} "
                             "is invalid: it must be an integer >= 1.")
        if (use_error_feedback or warm_start) and start_powerSGD_iter < 2:
            raise ValueError(f"compress.start_powerSGD_iter = {start_powerSGD_iter} is invalid: "
                             "with error feedback or warm start it must be >= 2 (DDP rebuilds its "
                             "buckets after the first step).")
        if bucket_cap_mb is not None and bucket_cap_mb <= 0:
            raise ValueError(f"compress.bucket_cap_mb = {bucket_cap_mb} is invalid: it must be > 0, "
                             "or null for the dist config's value.")
        self.kwargs = dict(matrix_approximation_rank=matrix_approximation_rank,
                           start_powerSGD_iter=start_powerSGD_iter,
                           min_compression_rate=min_compression_rate,
                           use_error_feedback=use_error_feedback, warm_start=warm_start,
                           orthogonalization_epsilon=orthogonalization_epsilon,
                           random_seed=random_seed)
        self.bucket_cap_mb = bucket_cap_mb
        self.state: powersgd.PowerSGDState | None = None
        self._counter = _Counter()

    def check(self, *, dist_name: str, optim: Any) -> None:
        if dist_name != "ddp":
            raise ValueError(f"compress=powersgd is a DDP communication hook; dist={dist_name} "
                             "cannot run it. Use dist=ddp, or compress=dgc / fp16.")

    def ddp_kwargs(self) -> dict[str, Any]:
        return {} if self.bucket_cap_mb is None else {"bucket_cap_mb": self.bucket_cap_mb}

    def attach_ddp(self, ddp_model: nn.parallel.DistributedDataParallel,
                   optimizer: torch.optim.Optimizer) -> None:
        self.state = powersgd.PowerSGDState(process_group=None, **self.kwargs)
        ddp_model.register_comm_hook(self, _powersgd_hook)

    def step_stats(self) -> CompressionStats:
        return self._counter.last

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        assert s is not None, "attach_ddp() first"
        kind, keys, pos, has_gauss, cached = s.rng.get_state()
        return {
            "name": self.name,
            "iter": s.iter,
            "rng": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                    "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "error": dict(s.error_dict),
            "p": dict(s.p_memory_dict),
            "q": dict(s.q_memory_dict),
            "total_numel_before_compression": s.total_numel_before_compression,
            "total_numel_after_compression": s.total_numel_after_compression,
            "counter_step": self._counter.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        s = self.state
        assert s is not None, "attach_ddp() first"
        s.iter = int(state["iter"])
        r = state["rng"]
        s.rng.set_state((r["kind"], r["keys"].numpy().astype(np.uint32), r["pos"], r["has_gauss"],
                         r["cached_gaussian"]))
        s.total_numel_before_compression = int(state["total_numel_before_compression"])
        s.total_numel_after_compression = int(state["total_numel_after_compression"])
        self._counter.step = int(state["counter_step"])
        self._pending_memories = (state["error"], state["p"], state["q"])

    def restore_memories(self, bucket: dist.GradBucket) -> None:
        """First hook call after a restore: put the saved memories back if the bucket matches."""
        pending = getattr(self, "_pending_memories", None)
        if pending is None or self.state is None:
            return
        error, p, q = pending
        i, n = bucket.index(), bucket.buffer().numel()
        if i in error and error[i].numel() != n:
            log.warning("PowerSGD: bucket %d has %d elements after the restart, %d before; error "
                        "feedback and warm start restart from zero", i, n, error[i].numel())
            self._pending_memories = None
            return
        for saved, live in ((error, self.state.error_dict), (p, self.state.p_memory_dict),
                            (q, self.state.q_memory_dict)):
            if i in saved:
                live[i] = saved[i].to(bucket.buffer().device)
        if bucket.is_last():
            self._pending_memories = None

    def describe(self) -> str:
        k = self.kwargs
        return (f"PowerSGD rank {k['matrix_approximation_rank']} after "
                f"{k['start_powerSGD_iter']} allreduce steps (PyTorch powerSGD_hook)")


def _powersgd_hook(state: PowerSGD, bucket):
    ps = state.state
    state.restore_memories(bucket)
    vanilla = ps.iter < ps.start_powerSGD_iter
    before = ps.total_numel_after_compression
    fut = powersgd.powerSGD_hook(ps, bucket)
    buf = bucket.buffer()
    numel = buf.numel() if vanilla else ps.total_numel_after_compression - before
    state._counter.add(bucket, sent=numel * buf.element_size(), elements_sent=numel,
                       dense_path=vanilla)
    return fut
