"""The common ending of the Horovod test workers: init, run one scenario, rank 0 writes its JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import horovod.torch as hvd
import torch


def run_and_report(run: Callable[[], dict], out: str, **init: Any) -> None:
    """``hvd.init(**init)``, ``run()`` on one thread, rank 0 writes the result (plus the world size)
    to ``out``, then ``hvd.shutdown()``."""
    torch.set_num_threads(1)
    hvd.init(**init)
    result = run()
    result["world_size"] = hvd.size()
    if hvd.rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    hvd.shutdown()


def main_with_node_sets(scenarios: dict[str, Callable[[], dict]], static: str,
                        nodes: Sequence[Sequence[int]]) -> None:
    """``python worker.py SCENARIO OUT``: run the scenario with dynamic process sets, or, for the
    scenario named ``static``, with only one process set per node registered at ``hvd.init``."""
    scenario, out = sys.argv[1], sys.argv[2]
    if scenario == static:
        init: dict[str, Any] = {"process_sets": [hvd.ProcessSet(list(g)) for g in nodes]}
    else:
        init = {"process_sets": "dynamic"}
    run_and_report(scenarios[scenario], out, **init)
