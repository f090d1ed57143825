"""The bandwidth sweep and its report: runs ``bench_bandwidth.py worker`` on simulated clusters
(``simcluster.py``) for each node count and link rate, then writes CSV/JSON, plots and a summary.

Called by ``bench_bandwidth.py sweep`` and ``bench_bandwidth.py report``; see docs/bandwidth.md.

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
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunSpec", "break_even", "report", "report_main", "rows_of", "sweep"]

_HERE = Path(__file__).resolve().parent
#: Sub-folder of the output with one JSON per cluster run ("runs/" is in .gitignore).
RUNS_DIR = "per_run"

#: Methods in plotting order, with a colour each.
COLORS = {
    "dense": "#444444",
    "fp16": "#8c8c8c",
    "powersgd-r1": "#1f77b4",
    "powersgd-r4": "#17becf",
    "topk": "#ff7f0e",
    "dgc": "#d62728",
    "dgc-fp16": "#9467bd",
}


@dataclass(kw_only=True, slots=True, frozen=True)
class RunSpec:
    """One cluster run of the sweep."""

    model: str
    nodes: int
    rate: str
    """Link rate as simcluster reads it: "1gbit", "10gbit", "unlimited"."""
    compute: str
    local_steps: int
    """0 = no codec run (the report then takes codec_s from another run of the same model and N)."""

    @property
    def name(self) -> str:
        return f"{self.model}-n{self.nodes}-{self.rate}"


# -------------------------------------------------------------------------------------------- sweep
def _grid(args: Any) -> list[RunSpec]:
    nodes = [int(x) for x in str(args.nodes).split(",") if x]
    rates = [x.strip() for x in str(args.bandwidths).split(",") if x.strip()]
    if not nodes or any(n < 2 for n in nodes):
        raise ValueError(f"--nodes {args.nodes!r}: give node counts >= 2, e.g. 2,4")
    if not rates:
        raise ValueError("--bandwidths is empty: give rates like 1gbit,10gbit,unlimited")
    grid = []
    for i, rate in enumerate(rates):  # rate by rate: a sweep cut short by --budget-s keeps the
        for n in nodes:  # first rates (1gbit, unlimited) for every node count
            # The codec time does not depend on the link: measure it once per node count.
            local = args.local_steps if i == 0 else 0
            grid.append(RunSpec(model=args.model, nodes=n, rate=rate, compute=args.compute,
                                local_steps=local))
    for item in [x for x in str(args.extra).split(",") if x.strip()]:
        try:
            model, n, rate = item.strip().split("@")
            grid.append(RunSpec(model=model, nodes=int(n), rate=rate, compute="synthetic",
                                local_steps=0))
        except ValueError as e:
            raise ValueError(f"--extra {item!r} must look like MODEL@NODES@RATE, e.g. "
                             "lstm@2@1gbit") from e
    return grid


def _worker_argv(args: Any, script: Path, run: RunSpec, out: Path, threads: int) -> list[str]:
    return [
        sys.executable, str(script), "worker",
        "--model", run.model,
        "--methods", args.methods,
        "--compute", run.compute,
        "--batch", str(args.batch),
        "--image-side", str(args.image_side),
        "--seq", str(args.seq),
        "--warmup", str(args.warmup),
        "--steps", str(args.steps),
        "--local-steps", str(run.local_steps),
        "--replay", str(args.replay),
        "--replay-budget-s", str(args.replay_budget_s),
        "--bucket-cap-mb", str(args.bucket_cap_mb),
        *(["--powersgd-bucket-cap-mb", str(args.powersgd_bucket_cap_mb)]
          if args.powersgd_bucket_cap_mb is not None else []),
        "--threads", str(threads),
        "--label", run.rate,
        "--out", str(out),
    ]


def sweep(args: Any, script: Path) -> int:
    """Run the grid (simulated clusters, or loopback with ``--loopback``), then :func:`report`."""
    out = Path(args.out)
    runs_dir = out / RUNS_DIR
    runs_dir.mkdir(parents=True, exist_ok=True)
    grid = _grid(args)
    t0 = time.monotonic()
    if not args.loopback:
        import simcluster

        problems = simcluster.check_environment()
        if problems:
            print("bench_bandwidth sweep: no simulated cluster here:\n  " + "\n  ".join(problems)
                  + "\n  (use --loopback to run without network namespaces)", file=sys.stderr)
            return 2
    failures = 0
    skipped: list[str] = []
    walls: dict[int, float] = {}
    budget = getattr(args, "budget_s", None)
    for run in grid:
        path = runs_dir / f"{run.name}.json"
        elapsed = time.monotonic() - t0
        if budget and elapsed + walls.get(run.nodes, 0.0) > budget:
            print(f"=== {run.name} skipped: {elapsed:.0f} s spent, a run of {run.nodes} nodes "
                  f"took {walls.get(run.nodes, 0.0):.0f} s, --budget-s {budget:.0f}", flush=True)
            skipped.append(run.name)
            continue
        threads = max(1, (os.cpu_count() or 1) // run.nodes)
        env_threads = {"OMP_NUM_THREADS": str(threads)}
        argv = _worker_argv(args, script, run, path, threads)
        print(f"=== {run.name} ({time.monotonic() - t0:.0f} s into the sweep)", flush=True)
        path.unlink(missing_ok=True)
        link: dict[str, Any] = {}
        started = time.monotonic()
        if args.loopback:
            ok = _run_loopback(run, argv, env_threads, args.run_timeout)
            link = {"simulated": False, "asked_bit_s": None}
        else:
            ok, link = _run_simcluster(run, argv, env_threads, args)
        if not ok or not path.exists():
            failures += 1
            print(f"=== {run.name} FAILED", file=sys.stderr, flush=True)
            continue
        data = json.loads(path.read_text())
        data["meta"]["link"] = link
        data["meta"]["rate"] = run.rate
        data["meta"]["host"] = platform.node()  # the nodes have host names node<i> of their own
        data["meta"]["wall_s"] = time.monotonic() - started
        walls[run.nodes] = max(walls.get(run.nodes, 0.0), data["meta"]["wall_s"])
        path.write_text(json.dumps(data, indent=1))
    total = time.monotonic() - t0
    print(f"=== sweep done in {total:.0f} s ({failures} failed, {len(skipped)} skipped runs)",
          flush=True)
    report(out, sweep_seconds=total, skipped=skipped)
    return 1 if failures else 0


def _run_loopback(run: RunSpec, argv: list[str], env_extra: dict[str, str], timeout: float) -> bool:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(run.nodes), *argv[1:]]
    env = {**os.environ, **env_extra}
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"{run.name}: timed out after {timeout} s", file=sys.stderr)
        return False
    return proc.returncode == 0


_NOISE = re.compile(
    r"hostname of the client socket cannot be retrieved|FutureWarning|return func\(\*args"
    r"|ddp = DDP\(|^\s*$"
)


def _print_node_line(rank: int, line: str) -> None:
    """Print a node's output line, without the warnings every run repeats."""
    if not _NOISE.search(line):
        print(f"[node{rank}] {line.rstrip()}", flush=True)


def _run_simcluster(run: RunSpec, argv: list[str], env_extra: dict[str, str],
                    args: Any) -> tuple[bool, dict[str, Any]]:
    import simcluster

    cfg = simcluster.SimClusterConfig(
        nodes=run.nodes,
        bandwidth_bit_s=simcluster.parse_rate(run.rate),
        delay_s=simcluster.parse_time(args.delay),
    )
    link: dict[str, Any] = {"simulated": True, "asked_bit_s": cfg.bandwidth_bit_s,
                            "delay_s": cfg.delay_s}
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "{nnodes}", "--node_rank", "{node_rank}", "--nproc_per_node", "1",
        "--master_addr", "{master_addr}", "--master_port", "{master_port}",
        *argv[1:],
    ]
    saved = {k: os.environ.get(k) for k in env_extra}
    os.environ.update(env_extra)  # SimCluster.node_env copies os.environ
    try:
        with simcluster.SimCluster(cfg) as cluster:
            if args.check != "off":
                try:
                    m = cluster.check_link()
                except simcluster.SimClusterError as e:
                    if args.check == "fail":
                        raise
                    print(f"{run.name}: link check: {e}", file=sys.stderr)
                    m = cluster.measure_link(0, 1)
                if m is not None:
                    link.update(measured_bit_s=m.throughput_bit_s, rtt_s=m.rtt_s)
            result = cluster.run(cmd, timeout_s=args.run_timeout, on_line=_print_node_line)
            return result.ok, link
    except simcluster.SimClusterError as e:
        print(f"{run.name}: {e}", file=sys.stderr)
        return False, link
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------- report
def _rate_bit_s(meta: dict[str, Any]) -> float | None:
    link = meta.get("link") or {}
    return link.get("asked_bit_s")


def rows_of(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows, one per (model, nodes, rate, method), with the derived figures:

    - ``ratio_payload``: dense fp32 gradient bytes / payload bytes a rank hands the collectives;
    - ``ratio_wire``: dense fp32 gradient bytes / measured tx bytes per node, divided by the
      copies the collective sends (ring allreduce ``2(N-1)/N``, allgather ``N-1``; for N = 2 both
      are 1, so this is the plain ratio of bytes on the wire);
    - ``wire_vs_dense``: measured tx bytes of dense allreduce / of this method (same N and link);
    - ``speedup``: dense step time / this method's; ``comm_vs_dense``: dense comm_replay_s / this.
    """
    codec: dict[tuple[str, int, str], dict[str, float | None]] = {}
    local_keys = ("local_step_s", "local_cpu_s", "codec_s", "codec_cpu_s")
    for run in runs:
        meta = run["meta"]
        for m in run["methods"]:
            if m.get("local_step_s") is not None:
                codec.setdefault((meta["model"], meta["nodes"], m["method"]),
                                 {k: _num(m.get(k)) for k in local_keys})
    rows = []
    for run in runs:
        meta = run["meta"]
        n = meta["nodes"]
        dense_fp32 = meta["dense_fp32_bytes"]
        by = {m["method"]: m for m in run["methods"]}
        base = by.get("dense")
        shared = meta.get("iface_shared", False)
        for m in run["methods"]:
            tx = _num(m.get("tx_bytes"))
            if shared and tx is not None:
                tx = tx / n  # lo counts every rank's traffic
            copies = _copies(m, n)
            c = codec.get((meta["model"], n, m["method"]), {})
            row = {
                "model": meta["model"],
                "nodes": n,
                "rate": meta.get("rate", meta.get("label", "")),
                "rate_bit_s": _rate_bit_s(meta),
                "link_measured_bit_s": (meta.get("link") or {}).get("measured_bit_s"),
                "compute": meta["compute"],
                "method": m["method"],
                "step_s": _num(m.get("step_s")),
                "comm_replay_s": _num(m.get("comm_replay_s")),
                "comm_inflight_s": _num(m.get("comm_inflight_s")),
                "hook_s": _num(m.get("hook_s")),
                **{k: c.get(k) for k in local_keys},
                "tx_bytes": tx,
                "rx_bytes": _num(m.get("rx_bytes")) / n if shared and m.get("rx_bytes")
                else _num(m.get("rx_bytes")),
                "payload_bytes": _num(m.get("payload_bytes")),
                "dgc_bytes_sent": (m.get("dgc_stats") or {}).get("bytes_sent"),
                "collectives": m.get("collectives"),
                "dense_fp32_bytes": dense_fp32,
                "ratio_payload": _div(dense_fp32, _num(m.get("payload_bytes"))),
                "ratio_wire": _div(dense_fp32 * copies, tx),
                "wire_vs_dense": _div(_num(base.get("tx_bytes")), _num(m.get("tx_bytes")))
                if base else None,
                "speedup": _div(_num(base.get("step_s")), _num(m.get("step_s"))) if base else None,
                "estimate_s": None,
                "comm_vs_dense": _div(_num(base.get("comm_replay_s")), _num(m.get("comm_replay_s")))
                if base else None,
                "iface": meta.get("iface"),
                "iface_shared": shared,
            }
            if row["local_cpu_s"] is not None and row["comm_replay_s"] is not None:
                row["estimate_s"] = row["local_cpu_s"] + row["comm_replay_s"]
            rows.append(row)
    return rows


def _copies(m: dict[str, Any], n: int) -> float:
    """How many times the payload crosses a node's link per step in the collectives used."""
    ops = m.get("ops") or []
    if ops and all(op["op"] != "all_reduce" for op in ops):
        return float(n - 1)  # allgather: each node sends its message to N-1 peers
    return 2.0 * (n - 1) / n  # ring allreduce: reduce-scatter + allgather


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def break_even(rows: list[dict[str, Any]], method: str, model: str, nodes: int) -> dict[str, Any]:
    """Link rate below which ``method`` beats dense allreduce, two ways:

    - ``fit_bit_s``: each method's measured step time as ``a + b / rate`` through its points at the two
      finite link rates of the sweep; the curves cross at ``(b_dense - b_m) / (a_m - a_dense)``;
    - ``cost_model_bit_s``: the cost model with measured parts, ``local_cpu_s + 8 * tx_bytes / rate``
      (CPU time of compute + codec on a one-rank group, i.e. on a dedicated core, plus the
      measured bytes at the link rate, no overlap).

    ``None`` = it never pays off (slower even at 0 bandwidth cost), ``inf`` = it always does.
    """

    def pts(meth: str) -> list[tuple[float, float]]:
        return sorted(
            (r["rate_bit_s"], r["step_s"]) for r in rows
            if r["model"] == model and r["nodes"] == nodes and r["method"] == meth
            and r["rate_bit_s"] and r["step_s"]
        )

    out: dict[str, Any] = {"method": method, "model": model, "nodes": nodes}
    fits = {}
    for meth in ("dense", method):
        p = pts(meth)
        if len(p) >= 2:
            (r1, t1), (r2, t2) = p[0], p[-1]
            b = (t1 - t2) / (1 / r1 - 1 / r2)
            fits[meth] = (t1 - b / r1, b)
    if len(fits) == 2:
        (ad, bd), (am, bm) = fits["dense"], fits[method]
        out["fit_a_s"], out["fit_b_bits"] = am, bm
        out["fit_bit_s"] = _cross(ad, bd, am, bm)
    one = [r for r in rows if r["model"] == model and r["nodes"] == nodes and r["rate_bit_s"]]
    d = next((r for r in one if r["method"] == "dense"), None)
    m = next((r for r in one if r["method"] == method), None)
    if d and m and d["local_cpu_s"] is not None and m["local_cpu_s"] is not None \
            and d["tx_bytes"] and m["tx_bytes"]:
        out["cost_model_bit_s"] = _cross(d["local_cpu_s"], 8 * d["tx_bytes"],
                                         m["local_cpu_s"], 8 * m["tx_bytes"])
    return out


def _cross(ad: float, bd: float, am: float, bm: float) -> float | None:
    """Rate where ``ad + bd/r == am + bm/r``; the method wins below it (it sends less, bm < bd)."""
    if bm >= bd:
        return None if am >= ad else math.inf
    if am <= ad:
        return math.inf  # cheaper locally and on the wire: wins at every rate
    return (bd - bm) / (am - ad)


def report_main(out: Path) -> int:
    report(out)
    return 0


def report(out: Path, sweep_seconds: float | None = None,
           skipped: list[str] | None = None) -> None:
    """bandwidth.json, bandwidth.csv, summary.md and the PNG plots from ``out/per_run/*.json``."""
    runs = [json.loads(p.read_text()) for p in sorted((out / RUNS_DIR).glob("*.json"))]
    runs = [r for r in runs if r.get("methods")]
    if not runs:
        raise FileNotFoundError(f"no runs in {out / RUNS_DIR}: run the sweep first")
    # The model with most runs first (it gets the plain plot names), then nodes, then link rate.
    count: dict[str, int] = {}
    for r in runs:
        count[r["meta"]["model"]] = count.get(r["meta"]["model"], 0) + 1
    runs.sort(key=lambda r: (-count[r["meta"]["model"]], r["meta"]["model"], r["meta"]["nodes"],
                             _rate_bit_s(r["meta"]) or math.inf))
    rows = rows_of(runs)
    if sweep_seconds is None and (out / "bandwidth.json").exists():  # a redraw keeps these
        old = json.loads((out / "bandwidth.json").read_text())
        sweep_seconds, skipped = old.get("sweep_seconds"), old.get("skipped")
    merged = {"sweep_seconds": sweep_seconds, "skipped": skipped or [],
              "runs": [_slim(r) for r in runs], "rows": rows}
    (out / "bandwidth.json").write_text(json.dumps(merged, indent=1))
    with open(out / "bandwidth.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "summary.md").write_text(_summary(rows, runs, sweep_seconds, skipped or []))
    _plots(rows, out)
    print((out / "summary.md").read_text())


def _slim(run: dict[str, Any]) -> dict[str, Any]:
    """A run without the per-bucket lists (they make the JSON large)."""
    methods = [{k: v for k, v in m.items() if k not in ("buckets",)} for m in run["methods"]]
    return {"meta": run["meta"], "methods": methods}


def _fmt(x: Any, scale: float = 1.0, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "inf" if x == math.inf else "-"
    return f"{x * scale:,.{digits}f}"


def _rate_label(rate: str) -> str:
    return {"unlimited": "unlimited"}.get(rate, rate.replace("gbit", " Gbit/s").replace(
        "mbit", " Mbit/s"))


def _summary(rows: list[dict[str, Any]], runs: list[dict[str, Any]],
             sweep_seconds: float | None, skipped: list[str]) -> str:
    lines = ["# Bandwidth benchmark: measured results", ""]
    metas = [r["meta"] for r in runs]
    m0 = metas[0]
    loads = [x[0] for meta in metas for x in (meta.get("loadavg"), meta.get("loadavg_end")) if x]
    lines.append(
        f"Machine: {m0.get('host')} ({os.cpu_count()} cores), torch {m0.get('torch')}, backend "
        f"{m0.get('backend')}, {m0.get('threads')} thread(s) per process, one process per node. "
        + (f"1-minute load average during the runs {min(loads):.1f} to {max(loads):.1f}. "
           if loads else "")
        + (f"Sweep wall time {sweep_seconds:.0f} s." if sweep_seconds else "")
        + (f" Skipped (time budget): {', '.join(skipped)}." if skipped else "")
    )
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        meta = next(x for x in metas if x["model"] == model)
        lines += [
            f"## {model}: {meta['params']:,} parameters in {meta['tensors']} tensors "
            f"({meta['compressed_tensors']} compressed by DGC, {meta['dense_tensors']} dense), "
            f"{meta['dense_fp32_bytes'] / 1e6:.1f} MB of fp32 gradients, compute "
            f"{meta['compute']}",
            "",
        ]
        for n in sorted({r["nodes"] for r in mrows}):
            nrows = [r for r in mrows if r["nodes"] == n]
            rates = list(dict.fromkeys(r["rate"] for r in nrows))
            lines += [f"### {n} nodes", ""]
            links = []
            for rate in rates:
                r = next(x for x in nrows if x["rate"] == rate)
                meas = r["link_measured_bit_s"]
                links.append(f"{_rate_label(rate)}: probe {_fmt(meas, 1e-9, 2)} Gbit/s"
                             if meas else _rate_label(rate))
            lines += ["Links: " + "; ".join(links) + ".", ""]
            hdr = ("| method | tx MB/step | payload MB | ratio payload | ratio wire | "
                   "codec ms wall / CPU | " + " | ".join(
                       f"step ms / comm ms @ {_rate_label(x)}" for x in rates)
                   + " | " + " | ".join(f"speedup @ {_rate_label(x)}" for x in rates) + " |")
            lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
            for meth in dict.fromkeys(r["method"] for r in nrows):
                per = {r["rate"]: r for r in nrows if r["method"] == meth}
                first = per[rates[0]]
                tx = [per[x]["tx_bytes"] for x in rates if x in per and per[x]["tx_bytes"]]
                tx_med = sorted(tx)[len(tx) // 2] if tx else None
                ratio_wire = _div(first["dense_fp32_bytes"] * _copies_row(first, n), tx_med)
                cells = [
                    meth,
                    _fmt(tx_med, 1e-6, 3),
                    _fmt(first["payload_bytes"], 1e-6, 3),
                    _fmt(first["ratio_payload"], 1, 1),
                    _fmt(ratio_wire, 1, 1),
                    f"{_fmt(first['codec_s'], 1e3, 0)} / {_fmt(first['codec_cpu_s'], 1e3, 0)}",
                ]
                cells += [
                    f"{_fmt(per[x]['step_s'], 1e3, 0)} / {_fmt(per[x]['comm_replay_s'], 1e3, 1)}"
                    if x in per else "-" for x in rates
                ]
                cells += [_fmt(per[x]["speedup"], 1, 2) if x in per else "-" for x in rates]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
            est = _estimate_table(nrows, rates)
            if est:
                lines += est
            be = [break_even(rows, meth, model, n)
                  for meth in dict.fromkeys(r["method"] for r in nrows) if meth != "dense"]
            be = [b for b in be if "fit_bit_s" in b or "cost_model_bit_s" in b]
            if be:
                lines += ["Break-even link rate vs dense allreduce (the method is faster below "
                          "it; inf = at every rate, - = never):", ""]
                lines += ["| method | from the step-time fit | from the cost model |",
                          "|---|---|---|"]
                for b in be:
                    lines.append(f"| {b['method']} | {_gbit(b.get('fit_bit_s', '?'))} | "
                                 f"{_gbit(b.get('cost_model_bit_s', '?'))} |")
                lines.append("")
    return "\n".join(lines) + "\n"


def _estimate_table(nrows: list[dict[str, Any]], rates: list[str]) -> list[str]:
    """Step time on a dedicated core per node: CPU time of the step on a one-rank group (compute +
    codec, ``local_cpu_s``) + the communication replay; no overlap.  Empty without codec runs."""
    methods = list(dict.fromkeys(r["method"] for r in nrows))
    est: dict[tuple[str, str], float] = {}
    for r in nrows:
        if r["local_cpu_s"] is not None and r["comm_replay_s"] is not None:
            est[(r["method"], r["rate"])] = r["local_cpu_s"] + r["comm_replay_s"]
    if not est:
        return []
    out = [
        "Estimated step time with a dedicated core per node (CPU time of compute + codec on a "
        "one-rank group, plus the measured communication replay, no overlap), ms, and speedup "
        "over dense:",
        "",
        "| method | " + " | ".join(_rate_label(x) for x in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for meth in methods:
        cells = []
        for rate in rates:
            t, base = est.get((meth, rate)), est.get(("dense", rate))
            cells.append(f"{t * 1e3:,.0f} ({base / t:.2f}x)" if t and base else "-")
        out.append(f"| {meth} | " + " | ".join(cells) + " |")
    return out + [""]


def _copies_row(row: dict[str, Any], n: int) -> float:
    if row["method"] in ("topk", "dgc", "dgc-fp16"):
        return float(n - 1)
    return 2.0 * (n - 1) / n


def _gbit(x: Any) -> str:
    if x == "?":
        return "n/a"
    if x is None:
        return "-"
    if x == math.inf:
        return "inf"
    return f"{x / 1e9:.2f} Gbit/s"


# -------------------------------------------------------------------------------------------- plots
def _plots(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        nodes = sorted({r["nodes"] for r in mrows})
        rates = list(dict.fromkeys(r["rate"] for r in mrows))
        methods = list(dict.fromkeys(r["method"] for r in mrows))
        suffix = "" if model == rows[0]["model"] else f"_{model}"
        if len(rates) > 1:
            for fname, panels in (
                ("time_vs_bandwidth", [
                    ("step_s", "measured step time (s), wall clock", False),
                    ("estimate_s", "estimate, dedicated core (s):\nCPU compute + codec + comm", False),
                ]),
                ("comm_vs_bandwidth", [
                    ("comm_replay_s", "communication time per step (s)", True),
                ]),
            ):
                panels = [p for p in panels if any(r.get(p[0]) for r in mrows)]
                fig, axes = plt.subplots(len(panels), len(nodes),
                                         figsize=(5.2 * len(nodes), 3.6 * len(panels)),
                                         squeeze=False, sharey="row")
                for row_axes, (key, ylabel, log) in zip(axes, panels, strict=True):
                    for ax, n in zip(row_axes, nodes, strict=True):
                        for meth in methods:
                            pts = [(i, r[key]) for i, rate in enumerate(rates) for r in mrows
                                   if r["nodes"] == n and r["rate"] == rate
                                   and r["method"] == meth and r.get(key)]
                            if pts:
                                ax.plot(*zip(*pts, strict=True), "o-", label=meth,
                                        color=COLORS.get(meth))
                        ax.set_xticks(range(len(rates)), [_rate_label(x) for x in rates])
                        if log:
                            ax.set_yscale("log")
                        ax.set_title(f"{model}, {n} nodes", fontsize=10)
                        ax.grid(True, which="both", alpha=0.3)
                    row_axes[0].set_ylabel(ylabel)
                    if not log:  # linear, from 0, to the row's highest point
                        top = max(r[key] for r in mrows if r.get(key))
                        row_axes[0].set_ylim(0, top * 1.08)
                for ax in axes[-1]:
                    ax.set_xlabel("link rate")
                axes[0][-1].legend(fontsize=7)
                fig.tight_layout()
                fig.savefig(out / f"{fname}{suffix}.png", dpi=90)
                plt.close(fig)
        # bytes per method (they do not depend on the link rate: the first rate's run)
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(nodes)
        for j, n in enumerate(nodes):
            vals = []
            for meth in methods:
                r = next((r for r in mrows if r["nodes"] == n and r["method"] == meth
                          and r["tx_bytes"]), None)
                vals.append(r["tx_bytes"] / 1e6 if r else 0)
            ax.bar([i + j * width for i in range(len(methods))], vals, width,
                   label=f"{n} nodes (measured tx per node)")
        ax.set_xticks([i + width * (len(nodes) - 1) / 2 for i in range(len(methods))], methods,
                      rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("MB sent per node per step")
        ax.set_title(f"{model}: bytes on the wire per step")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"bytes_per_method{suffix}.png", dpi=90)
        plt.close(fig)
        # speedup over dense: measured end to end, and the dedicated-core estimate
        combos = [(n, rate) for n in nodes for rate in rates
                  if any(r["nodes"] == n and r["rate"] == rate for r in mrows)]
        others = [m for m in methods if m != "dense"]

        def row(n: int, rate: str, meth: str, mrows=mrows) -> dict[str, Any] | None:
            return next((r for r in mrows if r["nodes"] == n and r["rate"] == rate
                         and r["method"] == meth), None)

        def est(r: dict[str, Any] | None) -> float | None:
            if r is None or r["local_cpu_s"] is None or r["comm_replay_s"] is None:
                return None
            return r["local_cpu_s"] + r["comm_replay_s"]

        panels = [("measured step time (wall clock, shared cores)",
                   lambda n, rate, m: (row(n, rate, m) or {}).get("speedup"))]
        if any(est(r) for r in mrows):
            panels.append((
                "estimate, a dedicated core per node:\nCPU time of compute + codec + comm replay",
                lambda n, rate, m: _div(est(row(n, rate, "dense")), est(row(n, rate, m))),
            ))
        fig, axes = plt.subplots(len(panels), 1, figsize=(max(7, 1.4 * len(combos)),
                                                          3.6 * len(panels)), squeeze=False)
        width = 0.8 / max(1, len(others))
        for ax, (title, value) in zip(axes[:, 0], panels, strict=True):
            for j, meth in enumerate(others):
                vals = [value(n, rate, meth) or 0 for n, rate in combos]
                ax.bar([i + j * width for i in range(len(combos))], vals, width, label=meth,
                       color=COLORS.get(meth))
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks([i + width * (len(others) - 1) / 2 for i in range(len(combos))],
                          [f"{n} nodes\n{_rate_label(rate)}" for n, rate in combos])
            ax.set_ylabel("speedup over dense")
            ax.set_title(f"{model}: {title}", fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=8, ncol=3)
        fig.tight_layout()
        fig.savefig(out / f"speedup{suffix}.png", dpi=90)
        plt.close(fig)
