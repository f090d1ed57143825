"""The policy sweep's report: reads ``per_run/*.json``, writes ``policy.json`` (rows, predictions,
goals), ``summary.md`` and two figures.  It runs nothing (the sweep is :mod:`.policy_sweep`).

Per row (one method of one cluster run): the measured step time (median of the interleaved steps,
mean over ranks), the bytes the node's interface sent per step (``tx_bytes``: what crossed the
slow link, since processes of one node talk over its loopback), and the cost model's prediction
(:func:`~.cost_model.predict_step`) from parts measured apart: the one-rank step of ``dense``
(compute + optimizer) and the sparse codec time of ``dgc`` at the same density (one-rank runs of
the unlimited run), the link check's rate and round trip, and the wire layouts of the codec
(:func:`~.scaling.traffic_of`).  Inside a node the prediction takes the rate the unlimited run's
link check measured (veth and loopback are both CPU-bound here).

Figures: ``step_time_vs_prediction.png`` (per run, measured and predicted step time per method),
``internode_bytes_vs_nodes.png`` (bytes per node per step on the inter-node link against the
number of nodes, flat vs ``hierarchy="node"``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .cost_model import Network, Traffic, predict_step
from .methods import WARMUP_DENSITY
from .report import RUNS_DIR, num
from .scaling import traffic_of

__all__ = ["PREDICTION_OF", "goals", "policy_report", "policy_rows"]

log = logging.getLogger("dgc.bench")

#: Which prediction of :func:`predict_step` stands beside each method.
PREDICTION_OF = {"dense": "dense", "dense-hook": "dense", "dgc-dense": "dense", "dgc": "sparse", "dgc-auto": "auto",
                 "dgc-node": "node", f"dgc@{WARMUP_DENSITY:g}": "sparse",
                 f"dgc-auto@{WARMUP_DENSITY:g}": "auto"}
_INTRA_DEFAULT_BIT_S = 10e9


def _density(method: str) -> float:
    return WARMUP_DENSITY if method.endswith(f"@{WARMUP_DENSITY:g}") else 0.001


def _local(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """One-rank figures per method (from the runs that measured them)."""
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        for m in run["methods"]:
            if num(m.get("local_step_s")) is not None:
                out.setdefault(m["method"], {"local_step_s": m["local_step_s"],
                                             "codec_s": num(m.get("codec_s")) or 0.0})
    return out


def _intra_bit_s(runs: list[dict[str, Any]]) -> float:
    for run in runs:
        link = run["meta"].get("link") or {}
        if link.get("asked_bit_s") is None and link.get("measured_bit_s"):
            return float(link["measured_bit_s"])
    return _INTRA_DEFAULT_BIT_S


def _predict(meta: dict[str, Any], method: str, local: dict[str, dict[str, float]], intra: float,
             traffic: dict[float, Traffic]) -> float | None:
    link = meta.get("link") or {}
    rate = link.get("measured_bit_s") or link.get("asked_bit_s")
    kind = PREDICTION_OF.get(method)
    base = local.get("dense")
    sparse = local.get("dgc" if _density(method) == 0.001 else f"dgc@{WARMUP_DENSITY:g}")
    if rate is None or kind is None or base is None or sparse is None:
        return None
    density = _density(method)
    if density not in traffic:
        traffic[density] = traffic_of(meta["model"], density, meta["procs_per_node"])
    net = Network(processes=meta["processes"], procs_per_node=meta["procs_per_node"], link_bit_s=rate,
                  latency_s=(link.get("rtt_s") or 0.0) / 2, intra_bit_s=intra,
                  codec_s=max(0.0, sparse["codec_s"]), local_s=base["local_step_s"])
    return float(predict_step(net, traffic[density])[kind])


def _run_label(meta: dict[str, Any]) -> str:
    tag = f"-{meta['tag']}" if meta.get("tag") else ""
    return f"n{meta['node_count']}x{meta['procs_per_node']}-{meta.get('rate')}{tag}"


def policy_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, method) with the measured figures and the prediction."""
    local, intra, traffic = _local(runs), _intra_bit_s(runs), {}
    rows = []
    for run in runs:
        meta = run["meta"]
        for m in run["methods"]:
            rows.append({
                "run": _run_label(meta), "tag": meta.get("tag") or "",
                "model": meta["model"], "nodes": meta["node_count"], "procs_per_node": meta["procs_per_node"],
                "rate": meta.get("rate"), "link_measured_bit_s": (meta.get("link") or {}).get("measured_bit_s"),
                "method": m["method"], "step_s": num(m.get("step_s")),
                "step_s_ranks": m.get("step_s_ranks"), "tx_bytes": num(m.get("tx_bytes")),
                "payload_bytes": num(m.get("payload_bytes")), "comm_replay_s": num(m.get("comm_replay_s")),
                "sparse_buckets": m.get("sparse_buckets"),
                "predicted_s": _predict(meta, m["method"], local, intra, traffic),
            })
    return rows


def _find(rows: list[dict[str, Any]], nodes: int, rate: str, method: str, tag: str = "",
          procs: int | None = None) -> dict[str, Any] | None:
    """The row of ``method`` in the run of ``nodes`` at ``rate`` with ``tag`` ("" = the main run) and
    ``procs`` processes per node (None: the sweep's main count, the fewest)."""
    if procs is None:
        procs = min((r["procs_per_node"] for r in rows if r.get("procs_per_node")), default=None)
    return next((r for r in rows if r["nodes"] == nodes and r["rate"] == rate and r["method"] == method
                 and (r.get("tag") or "") == tag and r.get("procs_per_node") == procs), None)


def _goal(name: str, value: float | None, target: str, met: bool | None, detail: str) -> dict[str, Any]:
    return {"goal": name, "value": value, "target": target, "met": met, "detail": detail}


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if not a or not b or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def goals(rows: list[dict[str, Any]], nodes: int = 2, slow: str = "1gbit") -> list[dict[str, Any]]:
    """Issue 13's goals, each with its measured value and whether it is met (None = not measured)."""
    def find(rate: str, method: str, tag: str = "") -> dict[str, Any] | None:
        return _find(rows, nodes, rate, method, tag)

    quarter = f"@{WARMUP_DENSITY:g}"
    out = []
    for suffix, label, tag in (("", "0.001", ""), (quarter, f"{WARMUP_DENSITY:g}", f"density-{WARMUP_DENSITY:g}")):
        dense = find("unlimited", "dense", tag)
        r = _ratio(find("unlimited", f"dgc-auto{suffix}", tag), dense, "step_s")
        sparse = _ratio(find("unlimited", f"dgc{suffix}", tag), dense, "step_s")
        hooked = _ratio(find("unlimited", f"dgc-auto{suffix}", tag), find("unlimited", "dense-hook", tag), "step_s")
        out.append(_goal(f"unlimited, density {label}: auto within 3% of dense", r, "auto/dense <= 1.03",
                         None if r is None else r <= 1.03, f"sparse/dense {sparse}, auto/dense-hook {hooked}"))
    r = _ratio(find(slow, "dgc-auto"), find(slow, "dgc"), "step_s")
    out.append(_goal(f"{slow}: auto within 5% of sparse", r, "auto/sparse <= 1.05", None if r is None else r <= 1.05, ""))
    r = _ratio(find(slow, "dense"), find(slow, "dgc-auto"), "step_s")
    out.append(_goal(f"{slow}: auto >= 2x faster than dense", r, "dense/auto >= 2", None if r is None else r >= 2, ""))
    r = _ratio(find(slow, "dgc-node"), find(slow, "dgc"), "tx_bytes")
    out.append(_goal(f"{slow}: hierarchy=node inter-node bytes <= half of flat", r, "node/flat tx <= 0.5",
                     None if r is None else r <= 0.5, "bytes per node per step, interface counters"))
    r = _ratio(find(slow, "dgc-node"), find(slow, "dgc"), "step_s")
    out.append(_goal(f"{slow}: hierarchy=node at least as fast as flat", r, "node/flat step <= 1.0",
                     None if r is None else r <= 1.0, ""))
    return out


def _summary(rows: list[dict[str, Any]], gl: list[dict[str, Any]], sweep_seconds: float | None,
             skipped: list[str]) -> str:
    lines = ["# Policy sweep (policy=auto, hierarchy=node)", "",
             "| run | method | step ms (measured) | step ms (cost model) | tx per node MB/step | auto's sparse buckets |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pred = "-" if r["predicted_s"] is None else f"{1e3 * r['predicted_s']:.0f}"
        step = "-" if r["step_s"] is None else f"{1e3 * r['step_s']:.0f}"
        tx = "-" if r["tx_bytes"] is None else f"{r['tx_bytes'] / 1e6:.3f}"
        sb = r["sparse_buckets"]
        auto = "-" if sb is None else f"{sum(sb)}/{len(sb)}"
        lines.append(f"| {r['run']} | {r['method']} | {step} | {pred} | {tx} | {auto} |")
    lines += ["", "| goal | value | target | met |", "| --- | --- | --- | --- |"]
    for g in gl:
        val = "-" if g["value"] is None else f"{g['value']:.3f}"
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {val} | {g['target']} | {met} |")
    lines += ["", f"Sweep time: {sweep_seconds:.0f} s." if sweep_seconds else "",
              f"Skipped runs: {', '.join(skipped)}." if skipped else ""]
    return "\n".join(line for line in lines if line is not None) + "\n"


def _plots(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        rr = [r for r in rows if r["run"] == run]
        xs = range(len(rr))
        ax.bar([x - 0.2 for x in xs], [(r["step_s"] or 0) * 1e3 for r in rr], 0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], [(r["predicted_s"] or 0) * 1e3 for r in rr], 0.4, label="cost model")
        ax.set_xticks(list(xs), [r["method"] for r in rr], rotation=30, fontsize=8)
        steps = [r["step_s"] for r in rr if r["step_s"]]
        if steps and max(steps) > 5 * min(steps):
            ax.set_yscale("log")
        ax.set_title(run, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("step time (ms)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "step_time_vs_prediction.png", dpi=80)
    plt.close(fig)

    _bytes_plot(rows, out, plt)


def bytes_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Inter-node MB per node per step against the number of nodes, per method and processes-per-node
    count (label -> points), at the rate-limited rates, where the counters see only DGC's traffic."""
    slow = [r for r in rows if r["tx_bytes"] and r["rate"] != "unlimited" and not r.get("tag")]
    series: dict[str, list[tuple[int, float]]] = {}
    for procs in sorted({r["procs_per_node"] for r in slow}):
        for method, label in (("dgc", "flat DGC"), ("dgc-node", "hierarchy=node")):
            first: dict[int, float] = {}
            for r in slow:
                if r["method"] == method and r["procs_per_node"] == procs:
                    first.setdefault(r["nodes"], r["tx_bytes"] / 1e6)  # the first rate listed per node count
            if first:
                series[f"{label}, {procs} per node"] = sorted(first.items())
    return series


def _bytes_plot(rows: list[dict[str, Any]], out: Path, plt: Any) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, pts in bytes_series(rows).items():
        ax.plot(*zip(*pts, strict=True), "s--" if label.startswith("hierarchy") else "o-", label=label)
    ax.set_xticks(sorted({r["nodes"] for r in rows}))
    ax.set_xlabel("nodes")
    ax.set_ylabel("inter-node MB per node per step (tx)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "internode_bytes_vs_nodes.png", dpi=80)
    plt.close(fig)


def policy_report(out: Path, sweep_seconds: float | None = None, skipped: list[str] | None = None) -> str:
    """policy.json, summary.md and the figures from ``out/per_run/*.json``; returns summary.md."""
    runs = [json.loads(p.read_text()) for p in sorted((out / RUNS_DIR).glob("*.json"))]
    runs = [r for r in runs if r.get("methods")]
    if not runs:
        raise FileNotFoundError(f"no runs in {out / RUNS_DIR}: run the policy sweep first")
    runs.sort(key=lambda r: (bool(r["meta"].get("tag")), r["meta"]["node_count"],
                             (r["meta"].get("link") or {}).get("asked_bit_s") or 0))
    rows = policy_rows(runs)
    gl = goals(rows)
    if sweep_seconds is None and (out / "policy.json").exists():
        old = json.loads((out / "policy.json").read_text())
        sweep_seconds, skipped = old.get("sweep_seconds"), old.get("skipped")
    meta = [{k: r["meta"].get(k) for k in ("run_name", "tag", "model", "node_count", "procs_per_node", "node_groups", "rate",
                                            "link", "compute", "options", "loadavg", "loadavg_end",
                                            "seconds", "wall_s")} for r in runs]
    (out / "policy.json").write_text(json.dumps(
        {"sweep_seconds": sweep_seconds, "skipped": skipped or [], "runs": meta, "rows": rows, "goals": gl},
        indent=1))
    text = _summary(rows, gl, sweep_seconds, skipped or [])
    (out / "summary.md").write_text(text)
    _plots(rows, out)
    return text
