"""launch/train.py with probes; tests/test_train_precision.py runs it under torchrun in place of
launch/train.py (same arguments).

What each rank observed is written to ``$TRAIN_PROBE_RECORD.<rank>.json`` at exit, from the outside
of the training loop (so a loop that ignored a setting cannot fake it):

* ``forward_dtypes``: dtypes of ``nn.Linear`` outputs in training forward passes (autocast), when
  ``TRAIN_PROBE_DTYPES=1`` (off for compiled runs: dynamo would trace the probe);
* ``scales``: ``torch.amp.GradScaler``'s scale after every ``update()``;
* ``compiled``: the types of what ``torch.compile`` was given and returned, and dynamo's count of
  compiled graphs.

It also registers a dynamo backend that always fails, ``probe_failing_backend``.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

import torch
import torch._dynamo
from torch import nn

TRAIN = Path(__file__).resolve().parent.parent / "launch" / "train.py"
RECORD: dict[str, list] = {"forward_dtypes": [], "scales": [], "compiled": []}

_linear_forward = nn.Linear.forward
_scaler_update = torch.amp.GradScaler.update
_compile = torch.compile


def _probed_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = _linear_forward(self, x)
    if torch.is_grad_enabled() and str(out.dtype) not in RECORD["forward_dtypes"]:
        RECORD["forward_dtypes"].append(str(out.dtype))
    return out


def _probed_update(self: torch.amp.GradScaler, *args, **kwargs) -> None:
    _scaler_update(self, *args, **kwargs)
    RECORD["scales"].append(float(self.get_scale()))


def _probed_compile(model, *args, **kwargs):
    out = _compile(model, *args, **kwargs)
    RECORD["compiled"].append({"given": type(model).__name__, "returned": type(out).__name__,
                               "backend": kwargs.get("backend")})
    return out


def probe_failing_backend(gm, example_inputs):
    raise RuntimeError("this backend always fails (tests/train_probe_worker.py)")


def _write() -> None:
    if RECORD["compiled"]:
        from torch._dynamo.utils import counters

        RECORD["unique_graphs"] = [int(counters["stats"]["unique_graphs"])]
    path = Path(f"{os.environ['TRAIN_PROBE_RECORD']}.{os.environ.get('RANK', '0')}.json")
    path.write_text(json.dumps(RECORD))


if __name__ == "__main__":
    if os.environ.get("TRAIN_PROBE_DTYPES") == "1":
        nn.Linear.forward = _probed_linear
    torch.amp.GradScaler.update = _probed_update
    torch.compile = _probed_compile
    atexit.register(_write)
    torch._dynamo.register_backend(probe_failing_backend)
    sys.argv = [str(TRAIN), *sys.argv[1:]]
    runpy.run_path(str(TRAIN), run_name="__main__")
