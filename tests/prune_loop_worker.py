"""launch/train.py with a check around DGC's selection; tests/test_pruning_loop.py runs it under
torchrun in place of launch/train.py (same arguments).

Every ``DGCState.compress`` call of a pruned tensor is checked against the pruner's live masks:
no selected index may be a pruned weight, the residual and momentum of pruned entries must be
zero after the call, and DGC's own mask must equal the pruner's. Each rank writes its counts to
``$PRUNE_LOOP_RECORD.<rank>.json`` at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

import torch

from dgc.pruning import Pruner
from dgc.state import DGCState

TRAIN = Path(__file__).resolve().parent.parent / "launch" / "train.py"
RECORD = {"compress_calls": 0, "calls_on_pruned_tensors": 0, "selected_pruned": 0,
          "memory_nonzero_pruned": 0, "dgc_mask_mismatch": 0}
_pruners: list[Pruner] = []
_pruner_init = Pruner.__init__
_compress = DGCState.compress


def _remembering_init(self: Pruner, *args, **kwargs) -> None:
    _pruner_init(self, *args, **kwargs)
    _pruners.append(self)


def _checked_compress(self: DGCState, name: str, grad: torch.Tensor, **kwargs):
    ct = _compress(self, name, grad, **kwargs)  # ct.indices: positions in the flat tensor
    RECORD["compress_calls"] += 1
    param = self.param_of(name)
    for target in (t for p in _pruners for t in p.targets if t.param is param):
        keep = target.mask.reshape(-1)
        if keep.all():
            continue
        RECORD["calls_on_pruned_tensors"] += 1
        RECORD["selected_pruned"] += int((~keep[ct.indices.long()]).sum())
        mem = self.memory[name]
        for buf in (mem.residual, mem.momentum):
            if buf is not None:
                RECORD["memory_nonzero_pruned"] += int((buf.reshape(-1)[~keep] != 0).sum())
        if mem.mask is None or not torch.equal(mem.mask.reshape(-1), keep):
            RECORD["dgc_mask_mismatch"] += 1
    return ct


def _write() -> None:
    path = Path(f"{os.environ['PRUNE_LOOP_RECORD']}.{os.environ.get('RANK', '0')}.json")
    path.write_text(json.dumps(RECORD))


if __name__ == "__main__":
    Pruner.__init__ = _remembering_init
    DGCState.compress = _checked_compress
    atexit.register(_write)
    sys.argv = [str(TRAIN), *sys.argv[1:]]
    runpy.run_path(str(TRAIN), run_name="__main__")
