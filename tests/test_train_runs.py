"""Real 2-rank runs of launch/train.py under torchrun (gloo): every compress option, exact resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launch" / "train.py"
# Small and fast: the digits CNN; every step logged; no progress bar.
QUICK = ("data=digits", "train.batch_size=16", "logger.log_every=1", "logger.progress=false")


def run_train(out: Path, *overrides: str, nproc: int = 2, timeout: float = 420.0) -> list[dict]:
    """torchrun --standalone launch/train.py; returns the records of its metrics.jsonl."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(TRAIN), *QUICK, f"hydra.run.dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=out.parent)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "dgc training summary" in proc.stdout  # printed once, by rank 0
    assert proc.stdout.count("dgc training summary") == 1
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steps(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if r["event"] == "step"}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> list[dict]:
    """One 8-step dense run, shared by the smoke test of plain DDP and the density-1 test."""
    return run_train(tmp_path_factory.mktemp("dense") / "run", "train.max_steps=8")


@pytest.mark.timeout(900)
def test_two_rank_smoke_run_dense(dense_run):
    by_step = steps(dense_run)
    assert sorted(by_step) == list(range(1, 9))  # train.max_steps is a contract
    assert all(math.isfinite(r["loss"]) for r in by_step.values())
    summary = dense_run[-1]
    assert summary["event"] == "summary" and summary["compress"] == "none"
    assert summary["world_size"] == 2 and summary["step"] == 8
    assert all(r["bytes_sent_per_step"] == r["dense_bytes_per_step"] > 0 for r in by_step.values())
    assert summary["compression_ratio"] == 1.0


@pytest.mark.timeout(900)
@pytest.mark.parametrize("compress", ["dgc", "topk", "fp16", "powersgd"])
def test_two_rank_smoke_run(tmp_path, compress):
    extra = [f"+compress={compress}"]
    if compress in ("dgc", "topk"):
        extra.append("compress.warmup_epochs=null")  # final density from step 3 on
    if compress == "powersgd":
        extra.append("compress.start_powerSGD_iter=2")
    records = run_train(tmp_path / "run", "train.max_steps=3", *extra)
    by_step = steps(records)
    assert sorted(by_step) == [1, 2, 3]  # train.max_steps is a contract
    assert all(math.isfinite(r["loss"]) for r in by_step.values())
    summary = records[-1]
    assert summary["event"] == "summary" and summary["step"] == 3
    assert summary["compress"] == compress and summary["world_size"] == 2
    assert 0 <= summary["test_accuracy"] <= 100
    last = by_step[3]  # the third step: past DGC's 2 dense steps and PowerSGD's 2 allreduce steps
    dense = last["dense_bytes_per_step"]
    assert dense == by_step[1]["dense_bytes_per_step"] > 0
    if compress == "fp16":
        assert last["bytes_sent_per_step"] == dense / 2 and last["achieved_density"] == 1.0
    else:
        assert by_step[1]["bytes_sent_per_step"] == dense  # dense warm-up steps
        assert last["bytes_sent_per_step"] < dense / 2, last
        assert last["achieved_density"] < 0.5
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("compress", ["dgc"])
def test_resume_continues_exactly(tmp_path, compress):
    """Checkpoint at step 6 of an 11-step run; resuming there gives the same losses, bit for bit.

    Step 6 is inside DGC's warm-up and epoch 1, so the resumed run must restore the DGC residuals
    and momenta of both ranks, the sampler position, the RNG (dropout) and the LR schedule.
    """
    common = ["train.max_steps=11", "train.epochs=2", f"+compress={compress}",
              "compress.warmup_epochs=0.2", "train.checkpoint.every_steps=6",
              "train.checkpoint.keep=null"]
    full = run_train(tmp_path / "full", *common)
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000006"
    assert (ckpt / "rank-00000.pt").is_file() and (ckpt / "rank-00001.pt").is_file()
    resumed = run_train(tmp_path / "resumed", *common, f"train.resume={ckpt}")
    a, b = steps(full), steps(resumed)
    assert sorted(b) == list(range(7, 12))
    assert [a[s]["loss"] for s in b] == [b[s]["loss"] for s in b]
    assert [a[s]["bytes_sent_per_step"] for s in b] == [b[s]["bytes_sent_per_step"] for s in b]
    assert full[-1]["test_loss"] == resumed[-1]["test_loss"]


@pytest.mark.timeout(900)
def test_dgc_at_full_density_trains_like_dense_momentum_sgd(tmp_path, dense_run):
    """DGC with density 1 and no momentum masking is momentum SGD with the momentum moved into
    the DGC state: the launcher's optimizer swap (SGD -> DGCSGD), the hook and the loop together
    must reproduce the dense run's losses."""
    dense = steps(dense_run)
    full = steps(run_train(tmp_path / "dgc", "train.max_steps=8", "train.checkpoint.dir=null",
                           "+compress=dgc", "compress.config.density=1.0",
                           "compress.warmup_epochs=null", "compress.config.momentum_masking=false",
                           "compress.config.sample_ratio=1"))
    assert full[8]["achieved_density"] == 1.0
    for s in range(1, 9):
        assert full[s]["loss"] == pytest.approx(dense[s]["loss"], rel=1e-5, abs=1e-6), s
    assert dense[8]["loss"] != dense[1]["loss"]  # it did train


@pytest.mark.timeout(900)
def test_two_rank_run_with_pruning_and_activation_sparsity(tmp_path):
    """+prune and +act plug into the loop: masks reach DGC, the sparsity report is written, and
    the masks are saved with the model."""
    import torch

    records = run_train(tmp_path / "run", "train.max_steps=4", "+compress=dgc",
                        "+prune=oneshot_unstructured", "+act=measure")
    summary = records[-1]
    assert summary["sparsity_report"].endswith("sparsity.md")
    report = (tmp_path / "run" / "sparsity.md").read_text()
    assert "Activation sparsity" in report and "Gradient density" in report
    common = torch.load(tmp_path / "run" / "checkpoints" / "step-00000004" / "common.pt",
                        weights_only=True)
    masks = {k: v for k, v in common["model"].items() if k.endswith("_mask")}
    assert masks and all(v.dtype == torch.bool for v in masks.values())
    kept = sum(int(v.sum()) for v in masks.values()) / sum(v.numel() for v in masks.values())
    assert kept < 0.5  # the one-shot schedule pruned most weights
    for name, mask in masks.items():  # pruned weights are exactly zero
        weight = common["model"][name.removesuffix("_mask")]
        assert torch.all(weight[~mask] == 0), name
