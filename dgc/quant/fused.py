"""The quantizers on the compiled CPU pass (:mod:`dgc.kernels.quant_fused`): the same bits as the
torch reference of :class:`~dgc.quant.quantizer.BlockQuantizer`, in one sweep per block.

Encode writes the message layout of :meth:`~dgc.quant.encoded.Encoded.to_bytes` directly (scales,
then packed codes, zero padding), so serializing costs nothing; with error feedback the same sweep
also writes the decoded values and the new residual.  int8 and TernGrad compute their scales
(``max |x|``) in the sweep; QSGD's L2 norms come from torch first (the reference's own call), so
they are the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dgc.kernels import quant_fused

from .blocks import block_width, num_blocks
from .encoded import Encoded, encoded_bytes
from .packing import packed_bytes

if TYPE_CHECKING:  # the quantizer imports this module when it dispatches
    from .quantizer import BlockQuantizer

__all__ = ["Fused", "fused_decode", "fused_encode"]


@dataclass(frozen=True, slots=True)
class Fused:
    """One fused encode."""

    encoded: Encoded
    sent: Tensor | None
    """float32 decoded values (when asked for)."""
    residual: Tensor | None
    """float32 ``x + residual - sent`` (when a residual was given)."""


def grid_of(q: BlockQuantizer) -> quant_fused.Grid:
    return quant_fused.Grid(method=q.method, levels=q.levels, bits=q.bits, stochastic=q.stochastic)


def _message(q: BlockQuantizer, n: int, out: Tensor | None) -> Tensor:
    """The buffer to encode into: ``out`` when usable (uint8, contiguous, 4-byte aligned, long
    enough), else a new one."""
    size = encoded_bytes(n, q.bits, q.chunk_size)
    if out is not None:
        if out.dtype != torch.uint8 or out.numel() < size:
            raise ValueError(f"encode: out must be a uint8 tensor of at least {size} bytes, got "
                             f"{out.dtype} of {out.numel()}")
        if out.is_contiguous() and out.data_ptr() % 4 == 0 and out.device.type == "cpu":
            return out.view(-1)[:size]
    return torch.empty(size, dtype=torch.uint8)


def fused_encode(q: BlockQuantizer, flat: Tensor, *, key: tuple[int, int] | None,
                 residual: Tensor | None = None, want_sent: bool = False,
                 out: Tensor | None = None) -> Fused:
    """Encode the flat float32 CPU tensor ``flat`` (+ ``residual``) with ``q``'s grid."""
    flat = flat.contiguous()
    n = flat.numel()
    nb, width = num_blocks(n, q.chunk_size), block_width(n, q.chunk_size)
    buf = _message(q, n, out)
    s, c = 4 * nb, packed_bytes(n, q.bits)
    buf[s + c :] = 0
    scales, codes = buf[:s].view(torch.float32), buf[s : s + c]
    src, res_in = flat, None if residual is None else residual.reshape(-1).to(torch.float32).contiguous()
    given = q.method == "qsgd"
    if given:  # torch's L2 norms, the reference's very call: needs x + residual as a tensor
        if res_in is not None:
            src, res_in = torch.add(flat, res_in), None
        scales.copy_(q.scales(src))
    new_res = None
    if residual is not None:
        new_res = src if src is not flat else torch.empty(n, dtype=torch.float32)
    sent = torch.empty(n, dtype=torch.float32) if want_sent or residual is not None else None
    if n:
        quant_fused.encode(grid_of(q), src, width, scales=scales, codes=codes, scales_given=given,
                           residual=res_in, residual_out=new_res, sent=sent, key=key or (0, 0))
    else:
        scales.zero_()
    q.check_finite(scales, lambda: flat if residual is None else flat + residual.reshape(-1))
    encoded = Encoded(codes=codes, scales=scales, numel=n, bits=q.bits, levels=q.levels,
                      chunk_size=q.chunk_size, message=buf)
    if out is not None and buf.data_ptr() != out.data_ptr():
        encoded = encoded.into(out)
    return Fused(encoded=encoded, sent=sent, residual=new_res)


def fused_decode(q: BlockQuantizer, encoded: Encoded, *, out: Tensor | None = None) -> Tensor:
    """The float32 values of ``encoded`` (into ``out`` when given)."""
    n = encoded.numel
    target = out.view(-1) if out is not None and out.is_contiguous() else None
    if target is not None and (target.dtype != torch.float32 or target.numel() != n):
        raise ValueError(f"decode: out must be a float32 tensor of {n} elements, got "
                         f"{out.dtype} of {out.numel()}")
    values = target if target is not None else torch.empty(n, dtype=torch.float32)
    if n:
        grid = quant_fused.Grid(method=q.method, levels=encoded.levels, bits=encoded.bits,
                                stochastic=False)
        quant_fused.decode(grid, encoded.codes.contiguous(),
                           encoded.scales.to(torch.float32).contiguous(), values,
                           block_width(n, encoded.chunk_size))
    if out is not None and target is None:
        out.copy_(values.view(out.shape))
        return out
    return values

