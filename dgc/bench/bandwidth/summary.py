"""summary.md: per model and node count, the table of every method (bytes, ratios, codec, step
and communication times, speedups), the dedicated-core estimate and the break-even link rates."""

from __future__ import annotations

import math
import os
from typing import Any

from .cost_model import break_even, copies_of_method, estimate_s

__all__ = ["fmt", "rate_label", "summary"]


def fmt(x: Any, scale: float = 1.0, digits: int = 1) -> str:
    """A number for a table: scaled, thousands separated; ``-`` if missing, ``inf``."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "inf" if x == math.inf else "-"
    return f"{x * scale:,.{digits}f}"


def rate_label(rate: str) -> str:
    """``1gbit -> '1 Gbit/s'``."""
    if rate == "unlimited":
        return rate
    return rate.replace("gbit", " Gbit/s").replace("mbit", " Mbit/s")


def _gbit(x: Any) -> str:
    if x == "?":
        return "n/a"
    if x is None:
        return "-"
    if x == math.inf:
        return "inf"
    return f"{x / 1e9:.2f} Gbit/s"


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _machine(runs: list[dict[str, Any]], sweep_seconds: float | None, skipped: list[str]) -> str:
    metas = [r["meta"] for r in runs]
    m0 = metas[0]
    loads = [x[0] for meta in metas for x in (meta.get("loadavg"), meta.get("loadavg_end")) if x]
    return (
        f"Machine: {m0.get('host')} ({os.cpu_count()} cores), torch {m0.get('torch')}, backend "
        f"{m0.get('backend')}, {m0.get('threads')} thread(s) per process, one process per node. "
        + (f"1-minute load average during the runs {min(loads):.1f} to {max(loads):.1f}. "
           if loads else "")
        + (f"Sweep wall time {sweep_seconds:.0f} s." if sweep_seconds else "")
        + (f" Skipped (time budget): {', '.join(skipped)}." if skipped else "")
    )


def _links(nrows: list[dict[str, Any]], rates: list[str]) -> str:
    links = []
    for rate in rates:
        r = next(x for x in nrows if x["rate"] == rate)
        meas = r["link_measured_bit_s"]
        links.append(f"{rate_label(rate)}: probe {fmt(meas, 1e-9, 2)} Gbit/s"
                     if meas else rate_label(rate))
    return "Links: " + "; ".join(links) + "."


def _method_line(meth: str, nrows: list[dict[str, Any]], rates: list[str], n: int) -> str:
    per = {r["rate"]: r for r in nrows if r["method"] == meth}
    first = per[next(x for x in rates if x in per)]
    tx = sorted(per[x]["tx_bytes"] for x in rates if x in per and per[x]["tx_bytes"])
    tx_med = tx[len(tx) // 2] if tx else None
    ratio_wire = _div(first["dense_fp32_bytes"] * copies_of_method(meth, n), tx_med)
    cells = [
        meth,
        fmt(tx_med, 1e-6, 3),
        fmt(first["payload_bytes"], 1e-6, 3),
        fmt(first["ratio_payload"], 1, 1),
        fmt(ratio_wire, 1, 1),
        f"{fmt(first['codec_s'], 1e3, 0)} / {fmt(first['codec_cpu_s'], 1e3, 0)}",
    ]
    cells += [f"{fmt(per[x]['step_s'], 1e3, 0)} / {fmt(per[x]['comm_replay_s'], 1e3, 1)}"
              if x in per else "-" for x in rates]
    cells += [fmt(per[x]["speedup"], 1, 2) if x in per else "-" for x in rates]
    return "| " + " | ".join(cells) + " |"


def _method_table(nrows: list[dict[str, Any]], rates: list[str], n: int) -> list[str]:
    hdr = ("| method | tx MB/step | payload MB | ratio payload | ratio wire | "
           "codec ms wall / CPU | "
           + " | ".join(f"step ms / comm ms @ {rate_label(x)}" for x in rates) + " | "
           + " | ".join(f"speedup @ {rate_label(x)}" for x in rates) + " |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    lines += [_method_line(meth, nrows, rates, n)
              for meth in dict.fromkeys(r["method"] for r in nrows)]
    return lines + [""]


def _estimate_table(nrows: list[dict[str, Any]], rates: list[str]) -> list[str]:
    """Step time on a dedicated core per node: CPU time of the step on a one-rank group (compute +
    codec, ``local_cpu_s``) + the communication replay; no overlap.  Empty without codec runs."""
    est = {(r["method"], r["rate"]): estimate_s(r) for r in nrows if estimate_s(r) is not None}
    if not est:
        return []
    out = [
        "Estimated step time with a dedicated core per node (CPU time of compute + codec on a "
        "one-rank group, plus the measured communication replay, no overlap), ms, and speedup "
        "over dense:",
        "",
        "| method | " + " | ".join(rate_label(x) for x in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for meth in dict.fromkeys(r["method"] for r in nrows):
        cells = []
        for rate in rates:
            t, base = est.get((meth, rate)), est.get(("dense", rate))
            cells.append(f"{t * 1e3:,.0f} ({base / t:.2f}x)" if t and base else "-")
        out.append(f"| {meth} | " + " | ".join(cells) + " |")
    return out + [""]


def _break_even_table(rows: list[dict[str, Any]], nrows: list[dict[str, Any]], model: str,
                      n: int) -> list[str]:
    be = [break_even(rows, meth, model, n)
          for meth in dict.fromkeys(r["method"] for r in nrows) if meth != "dense"]
    be = [b for b in be if "fit_bit_s" in b or "cost_model_bit_s" in b]
    if not be:
        return []
    lines = ["Break-even link rate vs dense allreduce (the method is faster below it; inf = at "
             "every rate, - = never):", "",
             "| method | from the step-time fit | from the cost model |", "|---|---|---|"]
    lines += [f"| {b['method']} | {_gbit(b.get('fit_bit_s', '?'))} | "
              f"{_gbit(b.get('cost_model_bit_s', '?'))} |" for b in be]
    return lines + [""]


def _model_section(rows: list[dict[str, Any]], model: str, meta: dict[str, Any]) -> list[str]:
    mrows = [r for r in rows if r["model"] == model]
    lines = [
        f"## {model}: {meta['params']:,} parameters in {meta['tensors']} tensors "
        f"({meta['compressed_tensors']} compressed by DGC, {meta['dense_tensors']} dense), "
        f"{meta['dense_fp32_bytes'] / 1e6:.1f} MB of fp32 gradients, compute {meta['compute']}",
        "",
    ]
    for n in sorted({r["nodes"] for r in mrows}):
        nrows = [r for r in mrows if r["nodes"] == n]
        rates = list(dict.fromkeys(r["rate"] for r in nrows))
        lines += [f"### {n} nodes", "", _links(nrows, rates), ""]
        lines += _method_table(nrows, rates, n)
        lines += _estimate_table(nrows, rates)
        lines += _break_even_table(rows, nrows, model, n)
    return lines


def summary(rows: list[dict[str, Any]], runs: list[dict[str, Any]],
            sweep_seconds: float | None, skipped: list[str]) -> str:
    """The text of summary.md."""
    lines = ["# Bandwidth benchmark: measured results", "",
             _machine(runs, sweep_seconds, skipped), ""]
    metas = [r["meta"] for r in runs]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += _model_section(rows, model, next(x for x in metas if x["model"] == model))
    return "\n".join(lines) + "\n"
