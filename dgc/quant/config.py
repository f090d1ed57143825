"""Settings of the quantized compressors (``int8``, ``terngrad``, ``qsgd``), validated on
construction: every ``ValueError``/``TypeError`` names the field, the constraint and the fix."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .int8 import Int8Quantizer
from .qsgd import QSGD
from .quantizer import NONFINITE_RULES, BlockQuantizer
from .terngrad import TernGrad

__all__ = ["METHODS", "QuantConfig"]

METHODS: tuple[str, ...] = ("int8", "terngrad", "qsgd")


@dataclass(kw_only=True, slots=True)
class QuantConfig:
    """What the user tunes for :class:`dgc.quant.QuantState` / ``+compress=int8|terngrad|qsgd``."""

    method: Literal["int8", "terngrad", "qsgd"] = "int8"
    """Quantizer: ``int8`` (linear, scale per block), ``terngrad`` (Wen et al. 2017, ternary, 2 bits)
    or ``qsgd`` (Alistarh et al. 2017, ``levels`` levels of the block's L2 norm)."""

    bits: int | None = None
    """int8 only: bits per element, 3..8 (None = 8).  terngrad is always 2 bits; qsgd's width
    follows from ``levels``."""

    levels: int | None = None
    """qsgd only: levels s per sign, 1..127 (None = 7, i.e. 4 bits per element)."""

    stochastic: bool | None = None
    """Stochastic (unbiased) rounding instead of round-to-nearest.  None = deterministic, except
    terngrad and qsgd without error feedback (the papers' unbiased estimators).  terngrad and qsgd
    refuse stochastic rounding *with* error feedback: their stochastic rounding is not a
    contraction (it can send +-s for a tiny element), so the residual grows instead of settling
    (QSGD's without bound); int8's error stays below one step and may round either way."""

    error_feedback: bool = True
    """Keep what rounding lost in a per-parameter residual, added to the next step's gradient, on
    both phases of the exchange.  False = the papers' estimators (unbiased with stochastic
    rounding), with no state."""

    chunk_size: int | None = 512
    """Elements that share one float32 scale (QSGD's "bucket size" d), >= 1.  None = one scale per
    message (each worker's shard of a DDP bucket).  Costs 32 bits per chunk on the wire."""

    nonfinite: Literal["raise", "propagate"] = "raise"
    """A NaN/Inf gradient on any rank: ``raise`` ``FloatingPointError`` from ``backward()`` on every
    rank, or ``propagate`` NaN into the averaged gradients (for ``torch.amp.GradScaler``).  Either
    way the step's gradient is kept in the residuals (error feedback on)."""

    check_finite: bool = True
    """Check every bucket for NaN/Inf (one host sync per bucket).  False = trust the gradients."""

    seed: int = 0
    """Seed of the stochastic rounding (each rank, step, bucket and phase draws its own stream)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig.method = {self.method!r} is invalid: use one of {METHODS}.")
        for name in ("stochastic",):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise TypeError(f"QuantConfig.{name} = {v!r} must be a bool, or None for the "
                                "method's default.")
        for name in ("error_feedback", "check_finite"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantConfig.{name} = {getattr(self, name)!r} must be a bool.")
        if self.nonfinite not in NONFINITE_RULES:
            raise ValueError(f"QuantConfig.nonfinite = {self.nonfinite!r} is invalid: use one of "
                             f"{NONFINITE_RULES}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"QuantConfig.seed = {self.seed!r} must be an integer.")
        if self.bits is not None and self.method != "int8":
            raise ValueError(f"QuantConfig.bits = {self.bits!r} is only for method='int8' (this is "
                             f"{self.method!r}: terngrad is 2 bits, qsgd's width follows from "
                             "levels). Leave bits null.")
        if self.levels is not None and self.method != "qsgd":
            raise ValueError(f"QuantConfig.levels = {self.levels!r} is only for method='qsgd'. "
                             "Leave levels null (int8 takes bits).")
        if self.stochastic and self.error_feedback and self.method != "int8":
            raise ValueError(
                f"QuantConfig.stochastic = True with error_feedback = True is refused for "
                f"method={self.method!r}: stochastic {self.method} rounding is not a contraction "
                "(a tiny element can be sent as the block's full scale), so the residual grows "
                "step after step instead of settling. Use stochastic=False (round to nearest) with "
                "error feedback, or error_feedback=False for the paper's unbiased estimator.")
        self.quantizer()  # the quantizer's own checks (bits, levels, chunk_size)

    def quantizer(self) -> BlockQuantizer:
        """The quantizer these settings describe (errors name the ``QuantConfig`` field)."""
        common: dict[str, Any] = {"chunk_size": self.chunk_size, "nonfinite": "propagate"}
        common["stochastic"] = self.rounding_is_stochastic
        try:
            if self.method == "int8":
                return Int8Quantizer(bits=8 if self.bits is None else self.bits, **common)
            if self.method == "terngrad":
                return TernGrad(**common)
            return QSGD(levels=7 if self.levels is None else self.levels, **common)
        except (ValueError, TypeError) as e:
            raise type(e)(f"QuantConfig.{e}") from e

    @property
    def rounding_is_stochastic(self) -> bool:
        """``stochastic`` with None resolved (see the field)."""
        if self.stochastic is not None:
            return self.stochastic
        return self.method != "int8" and not self.error_feedback

    @property
    def bits_per_element(self) -> int:
        """Bits per gradient element on the wire (scales not included)."""
        return self.quantizer().bits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
