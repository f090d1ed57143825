"""Error feedback: quantize ``x + residual`` and keep what the rounding lost for the next step.

``sent + new_residual == x + old_residual`` (to float32 rounding), so nothing is lost: every bit of
gradient is either on the wire now or waiting in the residual.  Without a residual (``None``) this
is the plain quantizer, i.e. the papers' estimator (unbiased when the rounding is stochastic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .encoded import Encoded
from .quantizer import BlockQuantizer

__all__ = ["Feedback", "quantize_with_feedback"]


@dataclass(frozen=True, slots=True)
class Feedback:
    """The outcome of one error-feedback quantization."""

    encoded: Encoded
    """What goes on the wire."""
    sent: Tensor
    """float32 values the receiver will decode (``quantizer.decode(encoded)``), flat."""
    residual: Tensor | None
    """``x + old residual - sent``, flat float32; None when no residual was given."""


def quantize_with_feedback(quantizer: BlockQuantizer, x: Tensor, residual: Tensor | None, *,
                           generator: torch.Generator | None = None) -> Feedback:
    """Quantize ``x`` (plus ``residual`` when given) with ``quantizer``; returns the new residual."""
    corrected = x.detach().reshape(-1).to(torch.float32)
    if residual is not None:
        corrected = corrected + residual.reshape(-1)
    encoded = quantizer.encode(corrected, generator=generator)
    sent = quantizer.decode(encoded)
    return Feedback(encoded=encoded, sent=sent,
                    residual=None if residual is None else corrected - sent)
