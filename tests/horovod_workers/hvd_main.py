"""The common ending of the Horovod test workers: init, run one scenario, rank 0 writes its JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
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
