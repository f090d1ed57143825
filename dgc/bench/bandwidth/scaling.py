"""Scale past this machine on paper: the cost model's step time for 8-256 GPUs.

``python -m dgc.bench.bandwidth.scaling`` (or ``launch/bench_bandwidth.py table``) prints, for a
model's real gradient shapes (:mod:`dgc.bench.grad_shapes`) at a density, the predicted step time of
dense allreduce, flat sparse DGC, ``policy="auto"``'s choice between them, and ``hierarchy="node"``,
per GPU count and link rate (:func:`~.cost_model.predict_step`).  Message sizes are not estimated:
they are the codec's own wire layouts (:class:`dgc.wire.BucketLayout`) of DDP-like buckets, and for
the node hierarchy the padded share messages of :class:`dgc.hierarchy.NodeTopology`'s split (element
shards cut to balance the messages, :mod:`dgc.hierarchy_shards`), which cross the nodes among peers
((n-1) W through the link per rank) and are then gathered inside the node.
The codec and compute times are assumptions given on the command line (docs/policy.md states them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import dgc
from dgc.bench import grad_shapes
from dgc.hierarchy import NodeTopology

from .cost_model import Network, Traffic, cross, predict_step

__all__ = ["ScalingRow", "main", "table", "traffic_of"]

GPUS = (8, 16, 32, 64, 128, 256)
RATES_GBIT = (25.0, 100.0)


def _buckets(sizes: list[tuple[str, int]], cap_bytes: int) -> list[tuple[str, ...]]:
    """DDP's buckets: parameters in reverse order (the backward's), up to ``cap_bytes`` each."""
    out: list[tuple[str, ...]] = []
    cur: list[str] = []
    used = 0
    for name, numel in reversed(sizes):
        if cur and used + 4 * numel > cap_bytes:
            out.append(tuple(cur))
            cur, used = [], 0
        cur.append(name)
        used += 4 * numel
    if cur:
        out.append(tuple(cur))
    return out


def traffic_of(model: str, density: float, procs_per_node: int, bucket_cap_mb: float = 25.0) -> Traffic:
    """Bytes per worker per step of ``model``'s gradients: dense, the flat DGC message and the node
    hierarchy's padded share message (``procs_per_node`` shares per bucket)."""
    with torch.device("meta"):
        net = grad_shapes.build(model)
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    state = dgc.DGCState(dgc.DGCConfig(density=density, dense_steps=0, log_every=0), params)
    topo = NodeTopology(nodes=[list(range(procs_per_node))], node=0, local_rank=0, intra=None)
    message = share = 0
    for names in _buckets([(n, p.numel()) for n, p in params], int(bucket_cap_mb * 1024 * 1024)):
        layout = state.codec.layout(names, sparse=True)
        message += layout.message_bytes
        share += max(s.message_bytes for s in topo.plan(state, layout))
    return Traffic(dense=4 * sum(p.numel() for _, p in params), message=message, share=share)


@dataclass(kw_only=True, frozen=True)
class ScalingRow:
    """One line of the table: predicted step seconds at one GPU count and link rate."""

    gpus: int
    nodes: int
    link_gbit: float
    dense_s: float
    sparse_s: float
    auto_s: float
    auto_choice: str
    node_s: float
    switch_gbit: float | None
    """Link rate above which ``auto`` goes dense (None: never sparse; inf: sparse at any rate)."""


def switch_bit_s(traffic: Traffic, n: int, codec_s: float, latency_s: float) -> float | None:
    """The link rate where flat sparse and dense allreduce predict the same time (sparse below)."""
    return cross(2 * (n - 1) * latency_s, 2 * (n - 1) / n * traffic.dense * 8,
                 codec_s + (n - 1) * latency_s, (n - 1) * traffic.message * 8)


def table(traffic: Traffic, *, gpus: Sequence[int] = GPUS, rates_gbit: Sequence[float] = RATES_GBIT,
          gpus_per_node: int = 8, codec_s: float, compute_s: float, latency_s: float,
          intra_gbit: float) -> list[ScalingRow]:
    """The predictions for every GPU count and link rate."""
    rows = []
    for rate in rates_gbit:
        for g in gpus:
            local = min(gpus_per_node, g)
            pred = predict_step(
                Network(processes=g, procs_per_node=local, link_bit_s=rate * 1e9, latency_s=latency_s,
                        intra_bit_s=intra_gbit * 1e9, codec_s=codec_s, local_s=compute_s),
                traffic,
            )
            rows.append(ScalingRow(gpus=g, nodes=g // local, link_gbit=rate, dense_s=pred["dense"],
                                   sparse_s=pred["sparse"], auto_s=pred["auto"],
                                   auto_choice=str(pred["auto_choice"]), node_s=pred["node"],
                                   switch_gbit=_gbit(switch_bit_s(traffic, g, codec_s, latency_s))))
    return rows


def _gbit(bit_s: float | None) -> float | None:
    return None if bit_s is None else bit_s / 1e9


def _rate(gbit: float | None) -> str:
    if gbit is None:
        return "never sparse"
    return "never" if gbit == float("inf") else f"{gbit:.0f} Gbit/s"


def markdown(rows: list[ScalingRow]) -> str:
    """The table as Markdown (ms)."""
    lines = ["| link | GPUs | nodes | dense ms | sparse (flat) ms | auto ms (choice) | "
             "sparse, hierarchy=node ms | auto goes dense above |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.link_gbit:g} Gbit/s | {r.gpus} | {r.nodes} | {1e3 * r.dense_s:.1f} | "
                     f"{1e3 * r.sparse_s:.1f} | {1e3 * r.auto_s:.1f} ({r.auto_choice}) | "
                     f"{1e3 * r.node_s:.1f} | {'(one node)' if r.nodes == 1 else _rate(r.switch_gbit)} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dgc.bench.bandwidth.scaling",
        description="The cost model's predicted step time for 8-256 GPUs (docs/policy.md).")
    p.add_argument("--table", action="store_true", help="print the table (the default action)")
    p.add_argument("--model", default="resnet50", choices=sorted(grad_shapes.MODELS))
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--codec-ms", type=float, default=5.0,
                   help="sparse encode + decode per step, whole model, one GPU (assumed, default 5)")
    p.add_argument("--compute-ms", type=float, default=100.0,
                   help="forward + backward + optimizer per step, not overlapped (default 100)")
    p.add_argument("--latency-us", type=float, default=10.0, help="per hop (default 10)")
    p.add_argument("--intra-gbit", type=float, default=1200.0,
                   help="inside a node (NVLink-class, default 1200 Gbit/s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    traffic = traffic_of(args.model, args.density, args.gpus_per_node)
    rows = table(traffic, gpus_per_node=args.gpus_per_node, codec_s=args.codec_ms / 1e3,
                 compute_s=args.compute_ms / 1e3, latency_s=args.latency_us / 1e6,
                 intra_gbit=args.intra_gbit)
    sys.stdout.write(
        f"{args.model} at density {args.density:g}: dense {traffic.dense:,} B, DGC message "
        f"{traffic.message:,} B per worker, hierarchy=node share message {traffic.share:,} B "
        f"({args.gpus_per_node} GPUs per node); codec {args.codec_ms:g} ms, compute "
        f"{args.compute_ms:g} ms, latency {args.latency_us:g} us, intra-node "
        f"{args.intra_gbit:g} Gbit/s\n\n{markdown(rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
