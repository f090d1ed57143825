"""The compiled quantizer pass's self-check (:mod:`dgc.kernels.quant_fused` runs it on every fresh
build, once :mod:`dgc.quant` registered it): a module of its own, above both the reference and the
fused dispatch it compares, so that no import goes in a circle."""

from __future__ import annotations

import torch

from .feedback import quantize_with_feedback
from .int8 import Int8Quantizer
from .qsgd import QSGD
from .terngrad import TernGrad

__all__ = ["self_check"]


def self_check() -> None:
    """Every method, both roundings, with and without error feedback, on awkward sizes: the compiled
    pass against the torch reference, bit for bit (a miscompiled or mismatched build must not run).
    Registered with :func:`dgc.kernels.quant_fused.register_self_check` by :mod:`dgc.quant`."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3 * 517 + 5, generator=gen)
    res = torch.randn(x.numel(), generator=gen)
    for q in (Int8Quantizer(bits=7, chunk_size=517), TernGrad(chunk_size=64, stochastic=True),
              QSGD(levels=5, chunk_size=100, stochastic=False), Int8Quantizer(stochastic=True)):  # fmt: skip
        for r in (None, res):
            want = quantize_with_feedback(q, x, r, generator=torch.Generator().manual_seed(3), backend="torch")
            got = quantize_with_feedback(q, x, r, generator=torch.Generator().manual_seed(3), backend="auto")
            same = (torch.equal(want.encoded.codes, got.encoded.codes)
                    and torch.equal(want.encoded.scales, got.encoded.scales)
                    and torch.equal(want.sent, got.sent)
                    and (r is None or torch.equal(want.residual, got.residual)))  # fmt: skip
            if not same:
                raise RuntimeError(f"the compiled quantizer disagrees with the torch reference ({q})")
