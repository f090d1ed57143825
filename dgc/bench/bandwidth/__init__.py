"""The bandwidth benchmark: gradient compressors side by side on the same model, network and run.

Modules: :mod:`.methods` (the compared methods, built from the training loop's classes),
:mod:`.counting` (a process group that records every collective), :mod:`.hooks` (per-bucket
hook timing), :mod:`.interface` (the kernel's byte counters), :mod:`.replay` (communication time
alone), :mod:`.stepping` (a method on a fresh DDP model, one measured step), :mod:`.interleave`
(every method stepped in turn), :mod:`.layout` (which ranks share a node), :mod:`.runner` (the
worker), :mod:`.sweep` (the grid on simulated clusters), :mod:`.report`, :mod:`.summary` and
:mod:`.plots` (the results), :mod:`.cost_model` (break-even link rates, the step prediction of
dense / sparse / auto / node), :mod:`.policy_sweep` and :mod:`.policy_report` (``policy="auto"`` and
``hierarchy="node"``, docs/policy.md), :mod:`.scaling` (the cost model for 8-256 GPUs, run as
``python -m dgc.bench.bandwidth.scaling``; not imported here), :mod:`.cli`. See docs/bandwidth.md.
"""

from .cost_model import break_even, cross
from .counting import CountingProcessGroup, counting_group, init_counting_process_group
from .methods import METHODS, MethodSpec
from .options import RunOptions
from .report import RUNS_DIR, report, rows_of
from .results import MethodResult
from .runner import measure_codec, run_method, run_worker, worker
from .sweep import RunSpec, SweepOptions, sweep

__all__ = [
    "METHODS",
    "RUNS_DIR",
    "CountingProcessGroup",
    "MethodResult",
    "MethodSpec",
    "RunOptions",
    "RunSpec",
    "SweepOptions",
    "break_even",
    "counting_group",
    "cross",
    "init_counting_process_group",
    "measure_codec",
    "report",
    "rows_of",
    "run_method",
    "run_worker",
    "sweep",
    "worker",
]
