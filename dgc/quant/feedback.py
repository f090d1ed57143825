"""Error feedback: quantize ``x + residual`` and keep what the rounding lost for the next step.

``sent + new_residual == x + old_residual`` (to float32 rounding), so nothing is lost: every bit of
gradient is either on the wire now or waiting in the residual.  Without a residual (``None``) this
is the plain quantizer, i.e. the papers' estimator (unbiased when the rounding is stochastic).

On a CPU with the compiled pass (:mod:`dgc.quant.fused`) the add, the scales, the rounding, the
packing, the decoded values and the new residual are one sweep, with the reference's bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import draw_key
from .encoded import Encoded
from .quantizer import Backend, BlockQuantizer, use_fused

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
                           generator: torch.Generator | None = None, out: Tensor | None = None,
                           backend: Backend = "auto") -> Feedback:
    """Quantize ``x`` (plus ``residual`` when given) with ``quantizer``; returns the new residual
    (a new tensor; ``residual`` is not modified).  ``out``/``backend``: as
    :meth:`BlockQuantizer.encode`."""
    flat = x.detach().reshape(-1).to(torch.float32)
    key = draw_key(generator) if quantizer.stochastic else None
    if use_fused(backend, flat):
        from .fused import fused_encode

        done = fused_encode(quantizer, flat, key=key, residual=residual, want_sent=True, out=out)
        return Feedback(encoded=done.encoded, sent=done.sent, residual=done.residual)
    corrected = flat if residual is None else flat + residual.reshape(-1).to(torch.float32)
    encoded = quantizer.encode_reference(corrected, key=key, out=out)
    sent = quantizer.decode(encoded, backend="torch")
    return Feedback(encoded=encoded, sent=sent,
                    residual=None if residual is None else corrected - sent)
