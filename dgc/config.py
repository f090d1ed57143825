"""Hyperparameters of Deep Gradient Compression, validated on construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch

__all__ = ["DGCConfig", "WIRE_DTYPES"]

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}
"""``DGCConfig.value_dtype`` names and the dtype of the values in a sparse message."""


@dataclass(kw_only=True, slots=True)
class DGCConfig:
    """What the user tunes.  Every field is checked in ``__post_init__`` (``ValueError`` names it).

    The defaults are those of the paper (Lin et al., ICLR 2018) and the official code.
    """

    density: float = 0.001
    """Final fraction of each compressed tensor's entries sent per step, 0 < density <= 1 (0.001 = the
    paper's 99.9% sparsity).  ``k = ceil(density * numel)`` pairs are sent per tensor."""

    momentum: float = 0.9
    """Momentum m of the momentum correction, 0 <= m < 1.  0 turns DGC into top-k with error feedback,
    usable with any optimizer (Adam included).  With m > 0 the optimizer must not apply momentum again."""

    nesterov: bool = False
    """Nesterov momentum correction: ``u <- m*(u + g)``, and the residual gets ``u + g``."""

    momentum_masking: bool = True
    """Momentum factor masking: zero the momentum of the entries just sent (paper, section 3.2)."""

    sample_ratio: float = 0.01
    """Fraction of entries sampled to estimate the selection threshold, 0 < r <= 1 (official default 1%).
    1 means an exact threshold.  The selected set is the exact top-k either way; sampling only makes the
    search faster."""

    warmup_steps: int = 0
    """Length, in communication steps after ``dense_steps``, of the exponential density warm-up: density
    falls geometrically from ``warmup_initial_density`` to ``density`` in ``warmup_stages`` equal stages
    (25%, 6.25%, 1.56%, 0.4%, then 0.1% with the defaults, as in the paper).  0 = off."""

    warmup_initial_density: float = 0.25
    """Density of the first warm-up stage, density <= value <= 1."""

    warmup_stages: int = 4
    """Number of equal-length stages of the warm-up (the density of stage i is
    ``initial * (density/initial)**(i/stages)``), >= 1."""

    dense_steps: int = 2
    """Communication steps at the start that use plain allreduce (momentum correction still applies).
    DDP rebuilds its buckets after the first step; >= 0."""

    clip_norm: float | None = None
    """Local gradient clipping: each tensor's local gradient is clipped to norm ``clip_norm / sqrt(N)``
    before it enters the accumulation (paper, section 3.3).  None = off."""

    min_compress_numel: int = 1024
    """Tensors with ``ndim <= 1`` (biases, norms) or fewer elements than this go dense, as in the official
    code; >= 1."""

    weight_decay: float = 0.0
    """L2 penalty added to the local gradient *before* momentum correction (PaddlePaddle's placement,
    equivalent to SGD's own weight decay under momentum; docs/algorithm.md#weight-decay).  0 = off, in which case the optimizer
    may apply its own (uncompressed) weight decay instead; never both."""

    value_dtype: str = "float32"
    """Dtype of the values in a sparse bucket's message: "float32", "float16", "bfloat16" or "int8".
    The rounding error of a narrower dtype stays in the residual, so nothing is lost.  "int8": the
    selected values *and* the dense-path tensors (biases, norms) of a sparse bucket travel as int8 codes
    in [-127, 127] with one float32 scale per tensor (``max|x| / 127`` of what the tensor sends; symmetric,
    zero point 0; round to nearest; see docs/wire.md): about 3 bytes per pair with block16 positions,
    past 700x on ResNet-50 at density 0.001.  Dense-allreduce buckets (the ``dense_steps``, buckets with
    no compressed tensor) keep the gradient's dtype whatever this says: a sum of int8 codes with
    different scales means nothing, and would overflow.  Indices: see ``index_format``."""

    index_format: Literal["auto", "int32", "block16", "bitmap"] = "auto"
    """How a message encodes the positions of its pairs (all lossless, fixed-size).  "int32": 4 bytes per
    pair.  "block16": the bucket is cut into blocks of 65,536 elements; the message holds one int32
    count per block and a 16-bit offset per pair (2 bytes per pair + 4 bytes per block, positions
    sorted).  "bitmap": one bit per element of the bucket (``numel / 8`` bytes whatever the number of
    pairs: smaller than block16 above a density of about 1/16, as in the warm-up's first stages).
    "auto" (default) takes, per bucket, whichever index is smallest: block16 as soon as a bucket sends
    more than two pairs per block (at density 0.001, every compressed bucket of more than a few
    thousand elements), bitmap at densities above ~1/16.  On ResNet-50 at density 0.001 it cuts a pair
    from 8 to ~6 bytes (float32).  See docs/wire.md."""

    nonfinite: Literal["raise", "propagate"] = "raise"
    """What a NaN/Inf local gradient does.  The step is not applied and nothing is lost: every rank puts
    what it sent in *every* bucket of the step back into its residuals (the bad gradient itself never
    enters them), then: "raise" raises ``FloatingPointError`` from ``backward()`` on every rank;
    "propagate" returns NaN gradients for the affected bucket, so ``torch.amp.GradScaler`` skips the step
    (use it with mixed precision)."""

    check_finite: bool = True
    """Check the local gradients for NaN/Inf every step (one reduction per bucket and, on a GPU, one
    device synchronization).  False skips the check: a NaN then poisons the residual."""

    backend: Literal["auto", "torch", "cupy"] = "auto"
    """Kernels: "auto" = CuPy for CUDA tensors when available, else the torch twins; or force one."""

    seed: int = 0
    """Seed of the random sample offsets (mixed with the rank)."""

    log_every: int = 100
    """Rank 0 logs the compression statistics every this many communication steps (0 = off)."""

    policy: Literal["sparse", "dense", "auto"] = "sparse"
    """How each group (DDP bucket, Horovod tensor) travels once the dense steps are over.  "sparse":
    DGC's allgather of top-k pairs (the paper).  "dense": momentum-corrected dense allreduce with the same
    state (DGC's momentum and residual, nothing selected): a baseline and the fallback.  "auto": per
    group, whichever a cost model predicts faster, from what the run measures (link bandwidth and latency
    from the dense allreduces, the codec's time per group, world size, message sizes); decided on rank 0,
    broadcast, re-decided every ``policy_interval`` steps and when the density changes, logged with the
    predicted times.  Before anything is measured, "auto" sends dense (and says so).  See docs/policy.md."""

    policy_interval: int = 100
    """With ``policy="auto"``: communication steps between two decisions (>= 1)."""

    hierarchy: Literal["flat", "node"] = "flat"
    """"flat": every process exchanges messages with every other.  "node": gradients are first averaged
    densely inside each node (fast links), then each process compresses its share of the tensors against
    its peers in the other nodes, so inter-node traffic grows with the number of nodes, not processes.
    Nodes come from torchrun's environment (``LOCAL_WORLD_SIZE``) or ``DGCState(..., node_groups=...)``.
    DDP hook only; see docs/policy.md."""

    node_reduce: Literal["auto", "shm", "collective"] = "auto"
    """With ``hierarchy="node"`` (DDP hook): how each share is summed onto its owner inside the node.
    "shm": through a shared-memory segment of the node (``/dev/shm``; CPU tensors, every process of the
    node on one host; an error otherwise).  "collective": one ``dist.reduce`` per share over the node's
    process group (gloo over loopback on CPU, NCCL on GPUs).  "auto" (default): shared memory for CPU
    buckets when the node's processes share a host and the segment fits in ``/dev/shm``, else the
    collective; rank 0 logs the choice.  Both give the same sums (up to the order of the additions)."""

    def __post_init__(self) -> None:
        self._check_types()
        _check(0.0 < self.density <= 1.0, "density", self.density, "0 < density <= 1 (0.001 = 99.9% sparsity)")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "0 <= momentum < 1 (0 = top-k with error feedback)")
        _check(0.0 < self.sample_ratio <= 1.0, "sample_ratio", self.sample_ratio, "0 < sample_ratio <= 1 (1 = exact)")
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0 (0 = off)")
        _check(
            0.0 < self.warmup_initial_density <= 1.0
            and (self.warmup_steps == 0 or self.density <= self.warmup_initial_density),
            "warmup_initial_density",
            self.warmup_initial_density,
            f"in [density ({self.density}), 1] when warmup_steps > 0",
        )
        _check(_is_int(self.warmup_stages) and self.warmup_stages >= 1, "warmup_stages", self.warmup_stages, "an integer >= 1")
        _check(_is_int(self.dense_steps) and self.dense_steps >= 0, "dense_steps", self.dense_steps, "an integer >= 0")
        _check(
            self.clip_norm is None or (math.isfinite(self.clip_norm) and self.clip_norm > 0),
            "clip_norm",
            self.clip_norm,
            "a positive number, or None to turn local clipping off",
        )
        _check(_is_int(self.min_compress_numel) and self.min_compress_numel >= 1, "min_compress_numel", self.min_compress_numel, "an integer >= 1")
        _check(self.weight_decay >= 0.0, "weight_decay", self.weight_decay, "weight_decay >= 0 (0 = off)")
        if isinstance(self.value_dtype, torch.dtype):  # accept torch.float16 as well as "float16"
            names = {v: k for k, v in WIRE_DTYPES.items()}
            _check(self.value_dtype in names, "value_dtype", self.value_dtype, f"one of {sorted(WIRE_DTYPES)}")
            self.value_dtype = names[self.value_dtype]
        _check(self.value_dtype in WIRE_DTYPES, "value_dtype", self.value_dtype, f"one of {sorted(WIRE_DTYPES)}")
        _check(self.index_format in ("auto", "int32", "block16", "bitmap"), "index_format", self.index_format,
               "'auto', 'int32', 'block16' or 'bitmap'")
        _check(self.nonfinite in ("raise", "propagate"), "nonfinite", self.nonfinite, "'raise' or 'propagate'")
        _check(_is_int(self.log_every) and self.log_every >= 0, "log_every", self.log_every, "an integer >= 0 (0 = off)")
        _check(self.backend in ("auto", "torch", "cupy"), "backend", self.backend, "'auto', 'torch' or 'cupy'")
        _check(self.policy in ("sparse", "dense", "auto"), "policy", self.policy, "'sparse', 'dense' or 'auto'")
        _check(_is_int(self.policy_interval) and self.policy_interval >= 1, "policy_interval", self.policy_interval, "an integer >= 1")
        _check(self.hierarchy in ("flat", "node"), "hierarchy", self.hierarchy, "'flat' or 'node' (then pass node_groups or run under torchrun)")
        _check(self.node_reduce in ("auto", "shm", "collective"), "node_reduce", self.node_reduce,
               "'auto', 'shm' (shared memory, CPU tensors on one host) or 'collective' (dist.reduce)")

    def _check_types(self) -> None:
        """Numbers must be numbers and flags must be bools, so that ``density="0.1"`` or ``nesterov="yes"``
        (a typo in a config file) fails here, naming the field, rather than deep inside a step."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                _check(isinstance(value, bool), f.name, value, "True or False")
            elif f.type in ("float", "float | None"):
                ok = (value is None and f.type.endswith("None")) or (_is_real(value) and math.isfinite(value))
                _check(ok, f.name, value, "a finite number" + (" or None" if f.type.endswith("None") else ""))
            elif f.type == "int":
                _check(_is_int(value), f.name, value, "an integer")

    @property
    def wire_dtype(self) -> torch.dtype:
        """``value_dtype`` as a torch dtype."""
        return WIRE_DTYPES[self.value_dtype]

    def density_at(self, step: int) -> float:
        """Density of communication step ``step`` (0-based): 1 during ``dense_steps``, then the warm-up."""
        if step < self.dense_steps:
            return 1.0
        s = step - self.dense_steps
        if self.warmup_steps == 0 or s >= self.warmup_steps:
            return self.density
        stage = s * self.warmup_stages // self.warmup_steps
        ratio = self.density / self.warmup_initial_density
        return self.warmup_initial_density * ratio ** (stage / self.warmup_stages)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check(ok: bool, field: str, value: object, constraint: str) -> None:
    if not ok:
        raise ValueError(f"DGCConfig.{field} = {value!r} is invalid: it must be {constraint}.")
