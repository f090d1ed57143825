"""The cost model with measured parts: how many copies a collective sends, the dedicated-core
step estimate, the link rate where a method stops beating dense allreduce (the formula:
docs/algorithm.md#cost-model), and the step time ``policy="auto"``'s cost model predicts for dense,
sparse and the node hierarchy (:func:`predict_step`; docs/policy.md).  ``python -m
dgc.bench.bandwidth.scaling`` prints it for 8-256 GPUs (:mod:`.scaling`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dgc.policy import gather_inside_s, predict

__all__ = ["GATHER_METHODS", "Network", "Traffic", "break_even", "copies", "copies_of_method",
           "cross", "estimate_s", "least_wire_bytes", "predict_step", "ring_allreduce_s"]

#: Methods whose message travels by allgather (each node sends it to N-1 peers).
GATHER_METHODS = ("topk", "dgc", "dgc-fp16", "dgc-int8", "dgc-node", "dgc@0.25")


def copies(ops: list[dict[str, Any]], n: int) -> float:
    """How many times the method's compressed gradient crosses a node's link per step in the
    collectives ``ops``: ``N-1`` for an allgather, ``2(N-1)/N`` for a ring allreduce and for the
    quantized compressors' two phases (all-to-all of ``(N-1)/N`` of it, then an all-gather of the
    own ``1/N`` to ``N-1`` peers: the bytes of a ring allreduce of the quantized gradient)."""
    if any(op["op"] == "all_to_all_single" for op in ops):
        return 2.0 * (n - 1) / n
    if ops and all(op["op"] != "all_reduce" for op in ops):
        return float(n - 1)  # allgather: each node sends its message to N-1 peers
    return 2.0 * (n - 1) / n  # ring allreduce: reduce-scatter + allgather


def copies_of_method(method: str, n: int) -> float:
    """:func:`copies` from the method's name (for rows that no longer hold their ops)."""
    return float(n - 1) if method in GATHER_METHODS else 2.0 * (n - 1) / n


def least_wire_bytes(ops: list[dict[str, Any]], n: int) -> float:
    """Bytes a rank's link must carry out per step for the collectives ``ops`` (payload only, no
    headers): ring allreduce ``2(N-1)/N``, allgather ``N-1``, all-to-all ``(N-1)/N`` of the input,
    broadcast the input (its root's share, the most any rank sends)."""
    factor = {"all_reduce": 2.0 * (n - 1) / n, "all_gather_single": float(n - 1),
              "all_gather": float(n - 1), "all_to_all_single": (n - 1) / n, "broadcast": 1.0}
    return sum(factor.get(op["op"], 1.0) * op["bytes"] for op in ops)


def estimate_s(row: dict[str, Any] | None) -> float | None:
    """Step time with a dedicated core: CPU time of the one-rank step (compute + codec) plus the
    communication replay, no overlap; None without both."""
    if row is None or row.get("local_cpu_s") is None or row.get("comm_replay_s") is None:
        return None
    return row["local_cpu_s"] + row["comm_replay_s"]


def cross(ad: float, bd: float, am: float, bm: float) -> float | None:
    """Rate where ``ad + bd/r == am + bm/r``; the method wins below it (it sends less, bm < bd).

    ``None`` = never (slower even at 0 bandwidth cost), ``inf`` = at every rate."""
    if bm >= bd:
        return None if am >= ad else math.inf
    if am <= ad:
        return math.inf  # cheaper locally and on the wire: wins at every rate
    return (bd - bm) / (am - ad)


def _fit(rows: list[dict[str, Any]], method: str, model: str, nodes: int) -> tuple[float, float] | None:
    """``(a, b)`` of step = a + b / rate through the method's points at the lowest and highest
    finite link rate; None with fewer than two."""
    pts = sorted(
        (r["rate_bit_s"], r["step_s"]) for r in rows
        if r["model"] == model and r["nodes"] == nodes and r["method"] == method
        and r["rate_bit_s"] and r["step_s"]
    )
    if len(pts) < 2:
        return None
    (r1, t1), (r2, t2) = pts[0], pts[-1]
    b = (t1 - t2) / (1 / r1 - 1 / r2)
    return t1 - b / r1, b


def break_even(rows: list[dict[str, Any]], method: str, model: str, nodes: int) -> dict[str, Any]:
    """Link rate below which ``method`` beats dense allreduce, two ways:

    - ``fit_bit_s``: each method's measured step time as ``a + b / rate`` through its points at
      the two finite link rates of the sweep; the curves cross at ``(b_dense - b_m) / (a_m -
      a_dense)``;
    - ``cost_model_bit_s``: the cost model with measured parts, ``local_cpu_s + 8 * tx_bytes /
      rate`` (CPU time of compute + codec on a one-rank group, i.e. on a dedicated core, plus
      the measured bytes at the link rate, no overlap).

    ``None`` = it never pays off (slower even at 0 bandwidth cost), ``inf`` = it always does.
    """
    out: dict[str, Any] = {"method": method, "model": model, "nodes": nodes}
    dense_fit, fit = _fit(rows, "dense", model, nodes), _fit(rows, method, model, nodes)
    if dense_fit is not None and fit is not None:
        out["fit_a_s"], out["fit_b_bits"] = fit
        out["fit_bit_s"] = cross(*dense_fit, *fit)
    one = [r for r in rows if r["model"] == model and r["nodes"] == nodes and r["rate_bit_s"]]
    d = next((r for r in one if r["method"] == "dense"), None)
    m = next((r for r in one if r["method"] == method), None)
    if d and m and d["local_cpu_s"] is not None and m["local_cpu_s"] is not None \
            and d["tx_bytes"] and m["tx_bytes"]:
        out["cost_model_bit_s"] = cross(d["local_cpu_s"], 8 * d["tx_bytes"],
                                        m["local_cpu_s"], 8 * m["tx_bytes"])
    return out


# ------------------------------------------------------------------------------------ predictions
@dataclass(kw_only=True, frozen=True)
class Network:
    """What the predictions assume of the network and the codec."""

    processes: int
    """Workers N (GPUs, or processes here)."""
    procs_per_node: int
    """Workers per node L (``hierarchy="node"`` averages inside a node first)."""
    link_bit_s: float
    """Each node's link to the others, bit/s per direction."""
    latency_s: float
    """Per message hop (half the round trip)."""
    intra_bit_s: float
    """Inside a node (NVLink, shared memory; loopback here)."""
    codec_s: float
    """Sparse encoding + decoding per step, whole model, one worker."""
    local_s: float
    """The rest of the step: compute and optimizer (no overlap with communication assumed)."""


@dataclass(kw_only=True, frozen=True)
class Traffic:
    """Bytes per worker per step."""

    dense: int
    """The fp32 gradients, B."""
    message: int
    """The flat DGC message M (every worker's, to every other)."""
    share: int
    """``hierarchy="node"``: the padded share message W (about M / L)."""


def ring_allreduce_s(nbytes: float, n: int, bit_s: float, latency_s: float) -> float:
    """Ring allreduce of ``nbytes`` over ``n`` workers: 2 (n-1)/n of it through each link."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes * 8 / bit_s + 2 * (n - 1) * latency_s


def predict_step(net: Network, traffic: Traffic) -> dict[str, float]:
    """Predicted step seconds of ``dense``, flat ``sparse``, ``auto`` (the faster of the two, as
    ``policy="auto"`` chooses) and ``node`` (``hierarchy="node"``, sparse): the library's cost
    model (:func:`dgc.policy.predict`, per step instead of per bucket) plus the rest of the step.
    ``node``: the dense intra-node stage (a ring allreduce's time, an upper bound for the reduce onto
    the owners), the share message W gathered across the n nodes (``(n-1) W`` through the link), the
    gather inside the node of the ``n W`` each rank got (:func:`dgc.policy.gather_inside_s`, no
    latency inside) and an L-th of the codec.  On a single node every link is the intra-node one."""
    n, local = net.processes, net.procs_per_node
    bw = (net.intra_bit_s if n <= local else net.link_bit_s) / 8
    flat = predict(n, traffic.dense, traffic.message, net.codec_s, bw, net.latency_s)
    intra = ring_allreduce_s(traffic.dense, local, net.intra_bit_s, 0.0)
    nodes = max(1, n // local)
    inside = gather_inside_s(nodes, min(local, n), traffic.share, net.intra_bit_s / 8, 0.0)
    node = predict(n, traffic.dense, traffic.share, net.codec_s / local, bw, net.latency_s,
                   peers=nodes, inside_s=inside)
    return {
        "dense": net.local_s + flat.dense,
        "sparse": net.local_s + flat.sparse,
        "auto": net.local_s + min(flat.dense, flat.sparse),
        "auto_choice": "sparse" if flat.choose_sparse else "dense",
        "node": net.local_s + intra + node.sparse,
    }

