"""Quantized gradient compressors: int8 (linear), TernGrad and QSGD, alone (not inside DGC).

Pure quantizers (``encode(x) -> Encoded``, ``decode(encoded) -> float32``) in :mod:`.int8`,
:mod:`.terngrad`, :mod:`.qsgd`; error feedback in :mod:`.feedback`; and a DDP communication hook
that exchanges them in two phases, so the bytes per worker stay about ``2 n bits / 8`` whatever
the number of workers (docs/quantization.md)::

    state = dgc.quant.QuantState(dgc.quant.QuantConfig(method="int8"), model.named_parameters())
    ddp_model.register_comm_hook(state, dgc.quant.quant_hook)
"""

from __future__ import annotations

from dgc.kernels import quant_fused

from .config import METHODS, QuantConfig
from .encoded import Encoded
from .exchange import ExchangePlan
from .feedback import Feedback, quantize_with_feedback
from .fused_check import self_check
from .hook import quant_hook
from .int8 import Int8Quantizer
from .qsgd import QSGD
from .quantizer import BlockQuantizer
from .state import QuantState
from .terngrad import TernGrad

quant_fused.register_self_check(self_check)  # a build must match the reference to be used

__all__ = [
    "METHODS",
    "QSGD",
    "BlockQuantizer",
    "Encoded",
    "ExchangePlan",
    "Feedback",
    "Int8Quantizer",
    "QuantConfig",
    "QuantState",
    "TernGrad",
    "quant_hook",
    "quantize_with_feedback",
]
