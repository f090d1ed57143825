"""What the worker measures: :class:`RunOptions` (the ``worker`` command's flags)."""

from __future__ import annotations

from dataclasses import dataclass

from .methods import METHODS, SWEEP_METHODS

__all__ = ["RunOptions"]


@dataclass(kw_only=True, slots=True)
class RunOptions:
    """What the worker measures; the CLI's flags (see ``worker --help``)."""

    model: str = "resnet50"
    """A name of ``dgc.bench.grad_shapes.MODELS``."""
    methods: tuple[str, ...] = SWEEP_METHODS
    """Names of ``METHODS`` to run, in this order."""
    compute: str = "real"
    """"real" (the model's forward/backward on a random batch), "synthetic" (fixed gradients) or
    "sleep" (fixed gradients, and ``compute_s`` of sleep per step standing for accelerator time: a
    third before the backward, two thirds spread over the backward's tensors, so the CPU stays free
    for the codec and buckets arrive over the backward as on a GPU)."""
    compute_s: float = 0.1
    """Seconds of modelled compute per step with ``compute="sleep"`` (0.1: ResNet-50's forward and
    backward at batch 32 on one V100-class GPU, about)."""
    interleave: bool = False
    """All methods attached at once (one DDP model each) and stepped in turn, step by step, so that a
    busy machine slows every method alike; False = one method after the other (less memory)."""
    batch: int = 4
    """Samples per rank per step (real compute)."""
    image_side: int = 32
    """Side of the random images (real compute, image models)."""
    seq: int = 8
    """Sequence length (real compute, token models)."""
    warmup: int = 3
    """Unmeasured steps first; must exceed DGC's dense_steps and PowerSGD's start iteration (2)."""
    steps: int = 5
    """Measured steps per method."""
    local_steps: int = 2
    """Measured steps on a one-rank group (for codec_s); 0 = skip."""
    replay: int = 2
    """Least repetitions of the communication replay (the fastest is reported; fast collectives
    are repeated up to 30 times within ``replay_budget_s``); 0 = skip."""
    replay_budget_s: float = 1.0
    """Seconds the replay of one method may take beyond ``replay`` rounds (0 = just those)."""
    bucket_cap_mb: float = 25.0
    """DDP bucket size (DDP's default 25)."""
    powersgd_bucket_cap_mb: float | None = None
    """Bucket size for PowerSGD; None = a single bucket on gloo (see
    docs/algorithm.md#collectives-from-the-hook-call), bucket_cap_mb on NCCL."""
    lr: float = 1e-4
    """Learning rate of every method's SGD (small: the random batch is not meant to be learnt)."""
    iface: str | None = None
    """Interface whose counters are read; None = $GLOO_SOCKET_IFNAME / $NCCL_SOCKET_IFNAME, else
    the default route's on a multi-node run, else lo."""
    label: str = ""
    """Free text stored with the results (the sweep puts the link rate here)."""

    def check(self) -> None:
        """Raise ValueError naming the flag if a setting cannot be measured."""
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"--methods: {m!r} is unknown; choose from {', '.join(METHODS)}")
        if self.warmup < 3:
            raise ValueError(
                f"--warmup {self.warmup} must be >= 3: DGC's 2 dense steps and PowerSGD's 2 "
                "vanilla steps are not what is measured, and DDP rebuilds its buckets after step 1 "
                "(methods that need more, e.g. dgc-auto, get their own MethodSpec.warmup)"
            )
        if self.compute not in ("real", "synthetic", "sleep"):
            raise ValueError(f"--compute {self.compute!r} must be 'real', 'synthetic' or 'sleep'")
        if not self.compute_s >= 0:
            raise ValueError(f"--compute-s {self.compute_s!r} must be >= 0 (seconds of sleep per step)")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps} must be >= 1")
