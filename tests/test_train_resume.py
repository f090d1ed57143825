"""The main job survives: resume on another world size, resume appends to metrics.jsonl, and a
worker killed mid-run is restarted by ``torchrun --max-restarts`` and continues from the last
checkpoint.  Real launch/train.py runs under torchrun (gloo, CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dgc.training.faults import EXIT_CODE

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launch" / "train.py"
QUICK = ("data=digits", "train.batch_size=16", "logger.log_every=1", "logger.progress=false",
         "+compress=dgc", "compress.warmup_epochs=null", "train.checkpoint.keep=null")


def torchrun(out: Path, *overrides: str, nproc: int, launcher: tuple[str, ...] = (),
             env: dict[str, str] | None = None, timeout: float = 420.0) -> str:
    """launch/train.py under torchrun --standalone; returns its output (stdout + stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *launcher, str(TRAIN), *QUICK, f"hydra.run.dir={out}", *overrides]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env,
                          cwd=out.parent)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{text[-5000:]}"
    assert proc.stdout.count("dgc training summary") == 1
    return text


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(recs: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in recs if r["event"] == "step"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """4 steps on 2 ranks, a checkpoint after step 4 (sparse DGC from step 3 on)."""
    out = tmp_path_factory.mktemp("two") / "run"
    torchrun(out, "train.max_steps=4", "train.checkpoint.every_steps=4", nproc=2)
    assert (out / "checkpoints" / "step-00000004" / "rank-00001.pt").is_file()
    return out


@pytest.mark.timeout(900)
def test_resume_on_one_rank_appends_to_the_runs_metrics(two_rank_run, tmp_path):
    """2 ranks -> 1, into the same run folder: the DGC states are resharded (logged), training
    continues at step 5, and metrics.jsonl keeps the first run's records (was: truncated)."""
    out = tmp_path / "run"
    shutil.copytree(two_rank_run, out)
    text = torchrun(out, "train.max_steps=6", f"train.resume={out / 'checkpoints'}", nproc=1)
    assert "written by 2 ranks, on 1 ranks" in text
    recs = records(out)
    losses = step_losses(recs)
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6], losses
    assert all(math.isfinite(loss) for _, loss in losses)
    assert losses[:4] == step_losses(records(two_rank_run))  # the first run's records, intact
    summaries = [r for r in recs if r["event"] == "summary"]
    assert [s["world_size"] for s in summaries] == [2, 1] and summaries[-1]["step"] == 6
    assert summaries[-1]["last_step_compression_ratio"] > 2  # still sparse DGC after the resize


@pytest.mark.timeout(900)
def test_resume_on_three_ranks(two_rank_run, tmp_path):
    out = tmp_path / "run"
    ckpt = two_rank_run / "checkpoints" / "step-00000004"
    text = torchrun(out, "train.max_steps=6", f"train.resume={ckpt}", nproc=3)
    assert "written by 2 ranks, on 3 ranks" in text
    recs = records(out)
    assert [s for s, _ in step_losses(recs)] == [5, 6]
    assert all(math.isfinite(loss) for _, loss in step_losses(recs))
    summary = recs[-1]
    assert summary["world_size"] == 3 and summary["step"] == 6
    # the new run's own checkpoint: three ranks, each with a DGC state of the 3-rank run at step 6
    import torch

    for rank in range(3):
        mine = torch.load(out / "checkpoints" / "step-00000006" / f"rank-{rank:05d}.pt",
                          weights_only=True)
        assert mine["comm"]["dgc"]["world_size"] == 3 and mine["comm"]["dgc"]["rank"] == rank
        assert mine["comm"]["dgc"]["step"] == 6


@pytest.mark.timeout(900)
def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(tmp_path):
    """Rank 1 exits hard after step 5 on the first attempt (dgc.training.faults); torchrun
    --max-restarts=1 restarts both workers, which resume (train.resume=auto) from the step-3
    checkpoint and finish the run.  Step 4 is then trained twice, from the same state: both
    records of it must agree exactly."""
    out = tmp_path / "run"
    text = torchrun(out, "train.max_steps=7", "train.checkpoint.every_steps=3", "train.resume=auto",
                    nproc=2, launcher=("--max-restarts=1",), env={"DGC_FAIL_AT_STEP": "1:5"})
    assert f"exitcode: {EXIT_CODE}" in text  # torchrun saw the simulated failure
    assert "resumed from" in text
    losses = step_losses(records(out))
    steps = [s for s, _ in losses]
    assert steps[-4:] == [4, 5, 6, 7] and steps[:3] == [1, 2, 3], steps  # 1..4(or 5), then 4..7
    first, second = (dict(losses[: steps.index(4, 4)]), dict(losses[steps.index(4, 4):]))
    assert first[4] == second[4]
    assert records(out)[-1]["step"] == 7 and records(out)[-1]["event"] == "summary"
