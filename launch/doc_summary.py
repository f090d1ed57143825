#!/usr/bin/env python3
"""Rewrite docs/training.md's example summary from a real run, so it cannot go stale.

    python launch/doc_summary.py             # runs the README's main command (seed 0), ~1 min
    python launch/doc_summary.py --record outputs/doc_summary/metrics.jsonl   # no run: reuse

It runs ``torchrun --standalone --nproc_per_node=2 launch/train.py +compress=dgc seed=0`` into
``outputs/doc_summary`` (removed first, so the run starts fresh), reads the ``summary`` record
from its ``metrics.jsonl``, renders it with ``dgc.training.format_summary`` (the function that
prints it at the end of every run) and replaces everything between the two markers of
docs/training.md (``BEGIN`` and ``END`` below) with: where and how long it ran, the summary
block, and the steady-state traffic it implies. The rest of the file is left as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgc.training.summary import format_bytes, format_summary  # noqa: E402

DOC = ROOT / "docs" / "training.md"
RUN_DIR = "outputs/doc_summary"
COMMAND = ["torchrun", "--standalone", "--nproc_per_node=2", "launch/train.py", "+compress=dgc",
           "seed=0"]
BEGIN = "<!-- doc_summary:begin (written by launch/doc_summary.py from a real run; do not edit) -->"
END = "<!-- doc_summary:end -->"

__all__ = ["BEGIN", "COMMAND", "END", "render_block", "replace_block", "summary_record"]


def render_block(record: dict[str, Any], *, wall_s: float, commit: str, torch_version: str) -> str:
    """The text between the markers for one ``summary`` record (markers excluded)."""
    out_dir = Path(record["out_dir"])
    if out_dir.is_absolute() and out_dir.is_relative_to(ROOT):
        record = {**record, "out_dir": str(out_dir.relative_to(ROOT))}
    lines = [
        *textwrap.wrap(f"On the 2-core VM ({wall_s:.0f} s in all, shared with other jobs; `git` "
                       f"{commit}, torch {torch_version}, `{' '.join(COMMAND)}`):", 100,
                       break_long_words=False, break_on_hyphens=False),
        "",
        "```",
        format_summary(record),
        "```",
    ]
    if "last_step_bytes_sent" in record:
        lines += [
            "",
            *textwrap.wrap(
                f"The whole-run ratio ({record['compression_ratio']:.1f}x) includes the density "
                f"warm-up of the first epoch (25% -> 0.1%); once it is over each worker sends "
                f"{format_bytes(record['last_step_bytes_sent'])} per step instead of "
                f"{format_bytes(record['dense_bytes_per_step'])} "
                f"({record['last_step_compression_ratio']:.1f}x).", 100),
        ]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between ``BEGIN`` and ``END`` replaced by ``block``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{DOC.relative_to(ROOT)} must hold the markers {BEGIN!r} and then "
                         f"{END!r} around the example summary; add them where it belongs")
    return text[:start + len(BEGIN)] + "\n" + block + "\n" + text[end:]


def summary_record(metrics: Path) -> dict[str, Any]:
    """The last ``summary`` record of a run's ``metrics.jsonl``."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summaries = [r for r in records if r.get("event") == "summary"]
    if not summaries:
        raise ValueError(f"{metrics} holds no 'summary' record: the run did not finish")
    return summaries[-1]


def _run() -> tuple[Path, float]:
    out = ROOT / RUN_DIR
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([*COMMAND, f"hydra.run.dir={RUN_DIR}"], cwd=ROOT, check=True)
    return out / "metrics.jsonl", time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", type=Path, help="reuse this metrics.jsonl instead of running")
    ap.add_argument("--wall-s", type=float, default=None, help="wall time to state with --record")
    args = ap.parse_args()
    if args.record is None:
        metrics, wall_s = _run()
    else:
        metrics, wall_s = args.record, args.wall_s or 0.0
    record = summary_record(metrics)
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip() or "unknown"
    block = render_block(record, wall_s=wall_s, commit=commit, torch_version=torch.__version__)
    DOC.write_text(replace_block(DOC.read_text(), block))
    print(f"{DOC.relative_to(ROOT)}: example summary rewritten from {metrics}")


if __name__ == "__main__":
    main()
