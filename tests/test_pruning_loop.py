"""The issue's combination in the training loop: +prune=agp_bank_balanced +act=topk +compress=dgc.

A real 2-rank torchrun of launch/train.py (through tests/prune_loop_worker.py, which checks every
DGC selection against the pruner's masks), short: AGP reaches 90% at step 6 of 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
QUICK = ("data=digits", "train.batch_size=16", "logger.log_every=1", "logger.progress=false")


@pytest.mark.timeout(900)
def test_agp_bank_balanced_with_topk_and_dgc_in_the_loop(tmp_path):
    out = tmp_path / "run"
    record = tmp_path / "record"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "prune_loop_worker.py"), *QUICK, f"hydra.run.dir={out}",
           "train.max_steps=8", "+prune=agp_bank_balanced", "+act=topk", "+compress=dgc",
           "compress.warmup_epochs=null",  # DGC's final density from step 3 on
           "prune.schedule.end_step=6", "prune.schedule.frequency=2",
           "prune.min_numel=0", "prune.schedule.sparsity=0.9"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNE_LOOP_RECORD": str(record)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    # Pruned coordinates were never selected; their residual and momentum stayed zero.
    for rank in (0, 1):
        counts = json.loads(Path(f"{record}.{rank}.json").read_text())
        assert counts["calls_on_pruned_tensors"] > 0, counts  # the check did run
        assert counts["selected_pruned"] == 0, counts
        assert counts["memory_nonzero_pruned"] == 0, counts
        assert counts["dgc_mask_mismatch"] == 0, counts

    # The report: three tables, with rows.
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["event"] == "summary" and summary["step"] == 8
    md = (out / "sparsity.md").read_text()
    for heading in ("### Weight sparsity", "### Activation sparsity", "### Gradient density"):
        assert heading in md
    assert "(no activation monitor)" not in md and "(no DGC state)" not in md
    report = json.loads((out / "sparsity.json").read_text())
    masked = {k: v for k, v in report["weights"].items() if v["masked"]}
    assert set(masked) == {"features.0.weight", "features.3.weight", "classifier.2.weight",
                           "classifier.5.weight"}
    assert all(v["sparsity"] == pytest.approx(0.9, abs=0.004) for v in masked.values()), masked
    outputs = {k: a for k, a in report["activations"].items() if a["feature_sparsity"] is None}
    assert set(outputs) == {"features.1", "features.4", "classifier.3"}  # the three ReLUs
    assert all(a["sparsity"] >= 0.89 for a in outputs.values()), outputs  # k-WTA keeps 10%
    grads = report["gradients"]
    assert grads["classifier.2.weight"]["compressed"]
    assert grads["classifier.2.weight"]["live"] == masked["classifier.2.weight"]["numel"] - \
        masked["classifier.2.weight"]["zeros"]

    # The checkpoint: masks with the model, pruned weights exactly zero, DGC memory zero there.
    step = out / "checkpoints" / "step-00000008"
    common = torch.load(step / "common.pt", weights_only=True)["model"]
    masks = {k.removesuffix("_mask"): v for k, v in common.items() if k.endswith("_mask")}
    assert set(masks) == {k.removesuffix(".weight") + ".weight" for k in masked}
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and torch.all(common[name][~mask] == 0), name
    for rank in (0, 1):
        dgc_state = torch.load(step / f"rank-{rank:05d}.pt", weights_only=True)["comm"]["dgc"]
        for name, mask in masks.items():
            mem = dgc_state[name]
            assert torch.equal(mem["mask"], mask), name
            assert torch.all(mem["residual"][~mask] == 0), name
            assert mem["momentum"] is None or torch.all(mem["momentum"][~mask] == 0), name
