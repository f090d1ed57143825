"""The report: reads the sweep's per-run JSON, writes ``bandwidth.json``, ``bandwidth.csv``,
``summary.md`` and the plots. It runs nothing (the sweep is :mod:`.sweep`).

Output folder::

    per_run/<model>-n<N>-<rate>.json  one worker run (all methods), plus the link it ran on
    bandwidth.json                  every run, merged
    bandwidth.csv                   one row per (model, nodes, rate, method)
    summary.md                      tables: ratios, times, speedups, break-even bandwidths
    time_vs_bandwidth.png, comm_vs_bandwidth.png, bytes_per_method.png, speedup.png
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from .cost_model import copies, estimate_s
from .plots import plots
from .summary import summary

__all__ = ["RUNS_DIR", "num", "rate_bit_s", "report", "rows_of"]

log = logging.getLogger("dgc.bench")

#: Sub-folder of the output with one JSON per cluster run.
RUNS_DIR = "per_run"


def rate_bit_s(meta: dict[str, Any]) -> float | None:
    """The link rate a run asked for (None = unlimited or not simulated)."""
    return (meta.get("link") or {}).get("asked_bit_s")


def num(x: Any) -> float | None:
    """``x`` as a finite float, else None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


_LOCAL_KEYS = ("local_step_s", "local_cpu_s", "codec_s", "codec_cpu_s")


def _codec_by_run(runs: list[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, float | None]]:
    """Codec figures per (model, nodes, method), from the runs that measured them (the sweep
    measures them once per node count)."""
    codec: dict[tuple[str, int, str], dict[str, float | None]] = {}
    for run in runs:
        meta = run["meta"]
        for m in run["methods"]:
            if m.get("local_step_s") is not None:
                codec.setdefault((meta["model"], meta["nodes"], m["method"]),
                                 {k: num(m.get(k)) for k in _LOCAL_KEYS})
    return codec


def _row(meta: dict[str, Any], m: dict[str, Any], base: dict[str, Any] | None,
         codec: dict[str, float | None]) -> dict[str, Any]:
    n = meta["nodes"]
    shared = meta.get("iface_shared", False)
    tx, rx = num(m.get("tx_bytes")), num(m.get("rx_bytes"))
    if shared:  # lo counts every rank's traffic
        tx = tx / n if tx is not None else None
        rx = rx / n if rx else rx
    dense_fp32 = meta["dense_fp32_bytes"]
    base = base or {}
    row = {
        "model": meta["model"],
        "nodes": n,
        "rate": meta.get("rate", meta.get("label", "")),
        "rate_bit_s": rate_bit_s(meta),
        "link_measured_bit_s": (meta.get("link") or {}).get("measured_bit_s"),
        "compute": meta["compute"],
        "method": m["method"],
        "step_s": num(m.get("step_s")),
        "comm_replay_s": num(m.get("comm_replay_s")),
        "comm_inflight_s": num(m.get("comm_inflight_s")),
        "hook_s": num(m.get("hook_s")),
        **{k: codec.get(k) for k in _LOCAL_KEYS},
        "tx_bytes": tx,
        "rx_bytes": rx,
        "payload_bytes": num(m.get("payload_bytes")),
        "dgc_bytes_sent": (m.get("dgc_stats") or {}).get("bytes_sent"),
        "collectives": m.get("collectives"),
        "dense_fp32_bytes": dense_fp32,
        "ratio_payload": _div(dense_fp32, num(m.get("payload_bytes"))),
        "ratio_wire": _div(dense_fp32 * copies(m.get("ops") or [], n), tx),
        "wire_vs_dense": _div(num(base.get("tx_bytes")), num(m.get("tx_bytes"))),
        "speedup": _div(num(base.get("step_s")), num(m.get("step_s"))),
        "estimate_s": None,
        "comm_vs_dense": _div(num(base.get("comm_replay_s")), num(m.get("comm_replay_s"))),
        "iface": meta.get("iface"),
        "iface_shared": shared,
    }
    row["estimate_s"] = estimate_s(row)
    return row


def rows_of(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows, one per (model, nodes, rate, method), with the derived figures:

    - ``ratio_payload``: dense fp32 gradient bytes / payload bytes a rank hands the collectives;
    - ``ratio_wire``: dense fp32 gradient bytes / measured tx bytes per node, divided by the
      copies the collective sends (ring allreduce ``2(N-1)/N``, allgather ``N-1``; for N = 2 both
      are 1, so this is the plain ratio of bytes on the wire);
    - ``wire_vs_dense``: measured tx bytes of dense allreduce / of this method (same N and link);
    - ``speedup``: dense step time / this method's; ``comm_vs_dense``: dense comm_replay_s / this.
    """
    codec = _codec_by_run(runs)
    rows = []
    for run in runs:
        meta = run["meta"]
        base = next((m for m in run["methods"] if m["method"] == "dense"), None)
        for m in run["methods"]:
            c = codec.get((meta["model"], meta["nodes"], m["method"]), {})
            rows.append(_row(meta, m, base, c))
    return rows


def _slim(run: dict[str, Any]) -> dict[str, Any]:
    """A run without the per-bucket lists (they make the JSON large)."""
    methods = [{k: v for k, v in m.items() if k != "buckets"} for m in run["methods"]]
    return {"meta": run["meta"], "methods": methods}


def _load_runs(out: Path) -> list[dict[str, Any]]:
    runs = [json.loads(p.read_text()) for p in sorted((out / RUNS_DIR).glob("*.json"))]
    runs = [r for r in runs if r.get("methods")]
    if not runs:
        raise FileNotFoundError(f"no runs in {out / RUNS_DIR}: run the sweep first")
    # The model with most runs first (it gets the plain plot names), then nodes, then link rate.
    count: dict[str, int] = {}
    for r in runs:
        count[r["meta"]["model"]] = count.get(r["meta"]["model"], 0) + 1
    runs.sort(key=lambda r: (-count[r["meta"]["model"]], r["meta"]["model"], r["meta"]["nodes"],
                             rate_bit_s(r["meta"]) or math.inf))
    return runs


def report(out: Path, sweep_seconds: float | None = None,
           skipped: list[str] | None = None) -> str:
    """bandwidth.json, bandwidth.csv, summary.md and the PNG plots from ``out/per_run/*.json``;
    returns summary.md's text. A redraw (no ``sweep_seconds``) keeps the earlier sweep's time
    and skipped runs."""
    runs = _load_runs(out)
    rows = rows_of(runs)
    if sweep_seconds is None and (out / "bandwidth.json").exists():
        old = json.loads((out / "bandwidth.json").read_text())
        sweep_seconds, skipped = old.get("sweep_seconds"), old.get("skipped")
    merged = {"sweep_seconds": sweep_seconds, "skipped": skipped or [],
              "runs": [_slim(r) for r in runs], "rows": rows}
    (out / "bandwidth.json").write_text(json.dumps(merged, indent=1))
    with open(out / "bandwidth.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    text = summary(rows, runs, sweep_seconds, skipped or [])
    (out / "summary.md").write_text(text)
    plots(rows, out)
    return text
