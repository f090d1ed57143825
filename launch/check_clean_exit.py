#!/usr/bin/env python3
"""Clean exit: run the README's toy DDP script (DGC hook, no barrier) N times under torchrun and count
the runs that end cleanly (docs/reliability.md#clean-exit).

A run is clean when torchrun exits 0, rank 0 printed its ``loss ...`` line, nothing printed
"terminate called" or "Fatal Python error", and it ended within the timeout.

    python launch/check_clean_exit.py                 # 20 runs: "N of 20 clean"
    python launch/check_clean_exit.py --without-dgc   # the same script with the two DGC lines removed
    python launch/check_clean_exit.py --stress        # never force a GIL hand-over (widens the race)

The script is taken from README.md at run time (the python block that registers
``dgc.ddp_comm_hook``), with any ``dist.barrier()`` line removed: the point is the exit without one.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunResult", "main", "run_once", "run_many", "toy_script"]

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HOOK_LINE = "ddp_model.register_comm_hook(state, dgc.ddp_comm_hook)"
STRESS = (
    "import sys\n"
    "sys.setswitchinterval(1000.0)  # stress: a thread waiting for the GIL never gets it by preemption\n"
)
ABORT_MARKERS = ("terminate called", "Fatal Python error")


@dataclass
class RunResult:
    """One torchrun of the toy script."""

    returncode: int | None
    """torchrun's exit status; None when the run was killed at the timeout."""
    output: str
    """stdout and stderr together."""
    seconds: float

    @property
    def clean(self) -> bool:
        return (
            self.returncode == 0
            and re.search(r"^loss \S+, sent", self.output, re.M) is not None
            and not any(m in self.output for m in ABORT_MARKERS)
        )

    def why(self) -> str:
        """One line on what went wrong (empty for a clean run)."""
        if self.clean:
            return ""
        if self.returncode is None:
            return f"timed out after {self.seconds:.0f} s"
        lines = [ln for ln in self.output.splitlines() if any(m in ln for m in ABORT_MARKERS)]
        lines += [ln for ln in self.output.splitlines() if "exitcode" in ln]
        return f"rc={self.returncode}: " + (" | ".join(ln.strip() for ln in lines[:3]) or "no loss line")


def toy_script(without_dgc: bool = False, stress: bool = False) -> str:
    """The README's toy DDP script (no barrier), optionally without its DGC lines or stressed."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if HOOK_LINE in b and "destroy_process_group" in b]
    if not found:
        raise ValueError(
            f"README.md: no python block with {HOOK_LINE!r} and destroy_process_group(); the clean-exit "
            "check runs the README's toy script: keep it in README.md."
        )
    lines = [ln for ln in found[0].splitlines() if "dist.barrier(" not in ln]
    if without_dgc:
        lines = [ln for ln in lines if "dgc.DGCState(" not in ln and HOOK_LINE not in ln]
        lines = [  # rank 0's line without the DGC counters, same indentation
            ln[: len(ln) - len(ln.lstrip())] + 'print(f"loss {loss.item():.4f}, sent 0 B of 0 B")'
            if "state.stats" in ln else ln
            for ln in lines
        ]
    text = "\n".join(lines) + "\n"
    return STRESS + text if stress else text


def run_once(script: Path, timeout: float = 120.0, nproc: int = 2) -> RunResult:
    """``torchrun --standalone --nproc_per_node=nproc script`` from the repository root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        return RunResult(None, text, time.monotonic() - start)
    return RunResult(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start)


def run_many(runs: int, timeout: float = 120.0, without_dgc: bool = False,
             stress: bool = False, verbose: bool = False) -> list[RunResult]:
    """``runs`` runs of :func:`toy_script`; prints a line per unclean run when ``verbose``."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "toy.py"
        script.write_text(toy_script(without_dgc=without_dgc, stress=stress))
        for i in range(runs):
            res = run_once(script, timeout=timeout)
            results.append(res)
            if verbose and not res.clean:
                print(f"run {i + 1}: {res.why()}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    ap.add_argument("--without-dgc", action="store_true", help="plain DDP: drop the two DGC lines")
    ap.add_argument("--stress", action="store_true",
                    help="sys.setswitchinterval(1000): no forced GIL hand-over to a waiting thread")
    args = ap.parse_args(argv)
    start = time.monotonic()
    results = run_many(args.runs, args.timeout, args.without_dgc, args.stress, verbose=True)
    clean = sum(r.clean for r in results)
    what = "plain DDP" if args.without_dgc else "DGC hook"
    print(f"{clean} of {args.runs} clean ({what}, no barrier{', stress' if args.stress else ''}; "
          f"{time.monotonic() - start:.0f} s)")
    return 0 if clean == args.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
