"""The report's figures: step and communication time against the link rate, bytes per method,
and the speedup over dense (measured, and the dedicated-core estimate)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cost_model import estimate_s
from .summary import rate_label

__all__ = ["COLORS", "plots"]

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

#: The line figures: file name -> panels (row key, y label, log scale).
_LINE_FIGURES = {
    "time_vs_bandwidth": [
        ("step_s", "measured step time (s), wall clock", False),
        ("estimate_s", "estimate, dedicated core (s):\nCPU compute + codec + comm", False),
    ],
    "comm_vs_bandwidth": [("comm_replay_s", "communication time per step (s)", True)],
}


@dataclass(kw_only=True, slots=True)
class _Model:
    """One model's rows and their axes."""

    name: str
    rows: list[dict[str, Any]]
    nodes: list[int]
    rates: list[str]
    methods: list[str]
    suffix: str
    """Appended to the file names ("" for the first model)."""

    def row(self, n: int, rate: str, meth: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["nodes"] == n and r["rate"] == rate
                     and r["method"] == meth), None)


def _line_panel(ax: Any, m: _Model, n: int, key: str, log: bool) -> None:
    for meth in m.methods:
        pts = [(i, r[key]) for i, rate in enumerate(m.rates)
               if (r := m.row(n, rate, meth)) is not None and r.get(key)]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=meth, color=COLORS.get(meth))
    ax.set_xticks(range(len(m.rates)), [rate_label(x) for x in m.rates])
    if log:
        ax.set_yscale("log")
    ax.set_title(f"{m.name}, {n} nodes", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def _line_figure(plt: Any, m: _Model, fname: str, out: Path) -> None:
    panels = [p for p in _LINE_FIGURES[fname] if any(r.get(p[0]) for r in m.rows)]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), len(m.nodes), figsize=(5.2 * len(m.nodes),
                             3.6 * len(panels)), squeeze=False, sharey="row")
    for row_axes, (key, ylabel, log) in zip(axes, panels, strict=True):
        for ax, n in zip(row_axes, m.nodes, strict=True):
            _line_panel(ax, m, n, key, log)
        row_axes[0].set_ylabel(ylabel)
        if not log:  # linear, from 0, to the row's highest point
            row_axes[0].set_ylim(0, max(r[key] for r in m.rows if r.get(key)) * 1.08)
    for ax in axes[-1]:
        ax.set_xlabel("link rate")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{fname}{m.suffix}.png", dpi=90)
    plt.close(fig)


def _bytes_figure(plt: Any, m: _Model, out: Path) -> None:
    """Bytes per method (they do not depend on the link rate: the first rate's run)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(m.nodes)
    for j, n in enumerate(m.nodes):
        vals = []
        for meth in m.methods:
            r = next((r for r in m.rows if r["nodes"] == n and r["method"] == meth
                      and r["tx_bytes"]), None)
            vals.append(r["tx_bytes"] / 1e6 if r else 0)
        ax.bar([i + j * width for i in range(len(m.methods))], vals, width,
               label=f"{n} nodes (measured tx per node)")
    ax.set_xticks([i + width * (len(m.nodes) - 1) / 2 for i in range(len(m.methods))], m.methods,
                  rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("MB sent per node per step")
    ax.set_title(f"{m.name}: bytes on the wire per step")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"bytes_per_method{m.suffix}.png", dpi=90)
    plt.close(fig)


def _measured_speedup(m: _Model, n: int, rate: str, meth: str) -> float | None:
    return (m.row(n, rate, meth) or {}).get("speedup")


def _estimated_speedup(m: _Model, n: int, rate: str, meth: str) -> float | None:
    base, t = estimate_s(m.row(n, rate, "dense")), estimate_s(m.row(n, rate, meth))
    return base / t if base and t else None


def _speedup_figure(plt: Any, m: _Model, out: Path) -> None:
    """Speedup over dense: measured end to end, and the dedicated-core estimate."""
    combos = [(n, rate) for n in m.nodes for rate in m.rates
              if any(r["nodes"] == n and r["rate"] == rate for r in m.rows)]
    others = [x for x in m.methods if x != "dense"]
    panels = [("measured step time (wall clock, shared cores)", _measured_speedup)]
    if any(estimate_s(r) for r in m.rows):
        panels.append(("estimate, a dedicated core per node:\nCPU time of compute + codec + "
                       "comm replay", _estimated_speedup))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7, 1.4 * len(combos)),
                                                      3.6 * len(panels)), squeeze=False)
    width = 0.8 / max(1, len(others))
    for ax, (title, value) in zip(axes[:, 0], panels, strict=True):
        for j, meth in enumerate(others):
            vals = [value(m, n, rate, meth) or 0 for n, rate in combos]
            ax.bar([i + j * width for i in range(len(combos))], vals, width, label=meth,
                   color=COLORS.get(meth))
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks([i + width * (len(others) - 1) / 2 for i in range(len(combos))],
                      [f"{n} nodes\n{rate_label(rate)}" for n, rate in combos])
        ax.set_ylabel("speedup over dense")
        ax.set_title(f"{m.name}: {title}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out / f"speedup{m.suffix}.png", dpi=90)
    plt.close(fig)


def plots(rows: list[dict[str, Any]], out: Path) -> None:
    """Every figure of every model into ``out`` (the first model's without a name suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        m = _Model(
            name=model,
            rows=mrows,
            nodes=sorted({r["nodes"] for r in mrows}),
            rates=list(dict.fromkeys(r["rate"] for r in mrows)),
            methods=list(dict.fromkeys(r["method"] for r in mrows)),
            suffix="" if model == rows[0]["model"] else f"_{model}",
        )
        if len(m.rates) > 1:
            for fname in _LINE_FIGURES:
                _line_figure(plt, m, fname, out)
        _bytes_figure(plt, m, out)
        _speedup_figure(plt, m, out)
