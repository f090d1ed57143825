"""launch/train.py under ``horovodrun --gloo -np 2`` (``dist=horovod``).

Skipped without Horovod, unless ``DGC_REQUIRE_HOROVOD=1`` (set by CI), where it fails instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launch" / "train.py"
REQUIRED = os.environ.get("DGC_REQUIRE_HOROVOD") == "1"


def _need_horovod() -> list[str]:
    try:
        import horovod.torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        why = (f"Horovod with PyTorch is not importable ({type(exc).__name__}: {exc}); run "
               "`bash launch/install_horovod.sh`")
        if REQUIRED:
            pytest.fail(f"DGC_REQUIRE_HOROVOD=1 but {why}", pytrace=False)
        pytest.skip(why)
    local = Path(sys.executable).parent / "horovodrun"
    found = str(local) if local.exists() else shutil.which("horovodrun")
    if found:
        return [found]
    return [sys.executable, "-c",
            "from horovod.runner.launch import run_commandline; run_commandline()"]


@pytest.mark.timeout(1300)
@pytest.mark.parametrize("compress", ["dgc"])
def test_horovod_run_and_resume(tmp_path, compress):
    import subprocess

    horovodrun = _need_horovod()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: Path, *extra: str) -> list[dict]:
        cmd = [*horovodrun, "--gloo", "-np", "2", "-H", "localhost:2", sys.executable, str(TRAIN),
               "dist=horovod", f"+compress={compress}", "data=digits", "train.batch_size=16",
               "logger.log_every=1", "logger.progress=false", "compress.warmup_epochs=0.2",
               "train.max_steps=6", "train.checkpoint.every_steps=3",
               "train.checkpoint.keep=null", f"hydra.run.dir={out}", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env,
                              cwd=tmp_path)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full")
    steps = {r["step"]: r for r in full if r["event"] == "step"}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in steps.values())
    summary = full[-1]
    assert summary["backend"] == "horovod" and summary["world_size"] == 2
    assert steps[1]["bytes_sent_per_step"] == steps[1]["dense_bytes_per_step"]  # dense steps
    assert steps[6]["bytes_sent_per_step"] < steps[6]["dense_bytes_per_step"] / 2  # sparse
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000003"
    resumed = run(tmp_path / "resumed", f"train.resume={ckpt}")
    again = {r["step"]: r["loss"] for r in resumed if r["event"] == "step"}
    assert sorted(again) == [4, 5, 6]
    assert [steps[s]["loss"] for s in again] == list(again.values())

    # The same run through torchrun + DDP's comm hook: dgc.horovod computes the same thing.
    ddp_out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TRAIN), f"+compress={compress}", "data=digits", "train.batch_size=16",
           "logger.log_every=1", "logger.progress=false", "compress.warmup_epochs=0.2",
           "train.max_steps=6", "train.checkpoint.dir=null", f"hydra.run.dir={ddp_out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = {r["step"]: r["loss"] for r in map(json.loads, (ddp_out / "metrics.jsonl").open())
           if r["event"] == "step"}
    assert [ddp[s] for s in sorted(ddp)] == pytest.approx([steps[s]["loss"] for s in sorted(ddp)],
                                                           rel=1e-6)
