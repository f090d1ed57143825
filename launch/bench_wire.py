"""Bytes on the wire per step of DGC for a real network's gradient shapes, per value dtype.

    python launch/bench_wire.py                      # ResNet-50, density 0.001, index_format auto
    python launch/bench_wire.py --model lstm --density 0.001 --dtypes float32 int8
    python launch/bench_wire.py --density 0.25 --index-format block16   # against auto's bitmap

Builds the model's parameter shapes (:mod:`dgc.bench.grad_shapes`), wraps them in DDP on a one-rank gloo
group with the DGC hook (``dense_steps=0``, so every step is sparse; DDP's own buckets, 25 MB), writes
synthetic gradients and runs a few steps.  Per value dtype it prints what one worker's messages hold
(pairs, dense-path elements, index, scale and value bytes, summed over the buckets' layouts), the bytes
the codec counted for the step (``state.stats.bytes_sent``, the same figure), and the compression ratio
against dense float32 gradients.  Payload bytes of our messages only: the kernel-counted traffic on the
simulated cluster is the bandwidth benchmark's (docs/bandwidth.md).  Results: docs/wire.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
from dgc.bench.grad_shapes import MODELS, SyntheticGradients, build


@dataclass(kw_only=True, slots=True)
class WireFigures:
    """One value dtype's message contents, summed over the step's buckets."""

    dtype: str
    buckets: int
    index_formats: dict[str, int]
    pairs: int
    dense_elements: int
    index_bytes: int
    scale_bytes: int
    value_bytes: int
    message_bytes: int
    counted_bytes: int
    dense_float32_bytes: int

    @property
    def ratio(self) -> float:
        return self.dense_float32_bytes / self.counted_bytes


def measure(
    model_name: str, density: float, dtype: str, steps: int, bucket_cap_mb: float, index_format: str = "auto"
) -> WireFigures:
    """Train ``steps`` synthetic steps with DGC on the one-rank group; figures of the last step."""
    model = build(model_name)
    gen = torch.Generator().manual_seed(0)
    directions = [torch.randn(p.shape, generator=gen) for p in model.parameters() if p.requires_grad]
    net = SyntheticGradients(model, directions)
    ddp = DDP(net, bucket_cap_mb=bucket_cap_mb)
    config = dgc.DGCConfig(density=density, dense_steps=0, value_dtype=dtype, index_format=index_format,
                           log_every=0)
    state = dgc.register(ddp, None, config)
    for step in range(steps):
        if step == steps - 1:
            state.codec.invalidate()  # keep only the last step's layouts (DDP rebuilds buckets at first)
        ddp.zero_grad(set_to_none=True)
        ddp(1.0 + step).backward()
        state.optimizer_stepped()
    layouts = [state.codec.layout(names) for names in state.codec.groups_at(density)]
    formats: dict[str, int] = {}
    for lay in layouts:
        kind = lay.index_format if lay.compressed else "dense"
        formats[kind] = formats.get(kind, 0) + 1
    sparse = [lay for lay in layouts if lay.compressed]
    return WireFigures(
        dtype=dtype,
        buckets=len(layouts),
        index_formats=formats,
        pairs=sum(lay.pairs for lay in sparse),
        dense_elements=sum(lay.dense_numel for lay in sparse),
        index_bytes=sum(lay.index_bytes for lay in sparse),
        scale_bytes=sum(4 * lay.scale_count for lay in sparse),
        value_bytes=sum(lay.value_size * (lay.pairs + lay.dense_numel) for lay in sparse),
        message_bytes=sum(lay.message_bytes for lay in sparse),
        counted_bytes=state.stats.bytes_sent,
        dense_float32_bytes=4 * sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16", "int8"])
    p.add_argument("--steps", type=int, default=2, help="steps run (DDP rebuilds its buckets after the first)")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--index-format", default="auto", choices=["auto", "int32", "block16", "bitmap"])
    args = p.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            rows = [measure(args.model, args.density, d, args.steps, args.bucket_cap_mb, args.index_format)
                    for d in args.dtypes]
        finally:
            dist.destroy_process_group()
    print(f"{args.model}: {rows[0].dense_float32_bytes:,} B of float32 gradients per step, density "
          f"{args.density:g}, index_format {args.index_format}, {rows[0].buckets} DDP buckets ({args.bucket_cap_mb:g} MB)")
    head = (f"{'values':>8} {'pairs':>8} {'dense el.':>9} {'index B':>9} {'scales B':>8} {'values B':>9} "
            f"{'message B':>10} {'counted B':>10} {'ratio':>7}  index formats")
    print(head)
    for r in rows:
        if r.message_bytes != r.counted_bytes:
            raise SystemExit(f"{r.dtype}: layouts say {r.message_bytes} B, the codec counted {r.counted_bytes} B")
        print(f"{r.dtype:>8} {r.pairs:>8,} {r.dense_elements:>9,} {r.index_bytes:>9,} {r.scale_bytes:>8,} "
              f"{r.value_bytes:>9,} {r.message_bytes:>10,} {r.counted_bytes:>10,} {r.ratio:>6.0f}x  "
              f"{r.index_formats}")


if __name__ == "__main__":
    main()
