"""Simulated worker failures, to test that a job survives them (``torchrun --max-restarts``).

Set ``DGC_FAIL_AT_STEP=RANK:STEP`` (e.g. ``1:5``) and rank RANK exits hard (``os._exit``: no
cleanup, no barrier, as a killed process would) right after optimizer step STEP, on the first
attempt only: torchrun numbers its restarts in ``TORCHELASTIC_RESTART_COUNT``, and a restarted
worker runs on.  Unset (the default), :func:`maybe_fail` does nothing.
"""

from __future__ import annotations

import logging
import os

__all__ = ["ENV", "EXIT_CODE", "maybe_fail"]

log = logging.getLogger(__name__)

ENV = "DGC_FAIL_AT_STEP"
"""Environment variable naming the failure: ``RANK:STEP``."""

EXIT_CODE = 43
"""Exit status of the simulated failure."""


def maybe_fail(step: int, rank: int) -> None:
    """Exit this process hard if ``DGC_FAIL_AT_STEP`` names this rank and step (first attempt only)."""
    spec = os.environ.get(ENV)
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return
    try:
        fail_rank, fail_step = (int(x) for x in spec.split(":"))
    except ValueError as e:
        raise ValueError(f"{ENV} = {spec!r} is invalid: use RANK:STEP, e.g. 1:5.") from e
    if rank == fail_rank and step == fail_step:
        log.error("%s: rank %d exits hard after step %d (simulated failure)", ENV, rank, step)
        logging.shutdown()
        os._exit(EXIT_CODE)
