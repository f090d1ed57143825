"""train.precision (bf16, fp16 + GradScaler) and train.compile in the main job: real 2-rank runs of
launch/train.py under torchrun (gloo), observed from outside the loop by tests/train_probe_worker.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
WORKER = HERE / "train_probe_worker.py"
QUICK = ("data=digits", "train.batch_size=16", "logger.log_every=1", "logger.progress=false")


def run(tmp_path: Path, name: str, *overrides: str, dtypes: bool = True,
        timeout: float = 600.0) -> tuple[list[dict], list[dict], str]:
    """torchrun of the probe worker; returns (metrics records, each rank's probe record, stdout)."""
    out, record = tmp_path / name, tmp_path / f"{name}-probe"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), *QUICK, f"hydra.run.dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAIN_PROBE_RECORD": str(record),
           "TRAIN_PROBE_DTYPES": "1" if dtypes else "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    probes = [json.loads(Path(f"{record}.{rank}.json").read_text()) for rank in (0, 1)]
    return records, probes, proc.stdout


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r["event"] == "step"}


@pytest.mark.timeout(900)
def test_bf16_runs_the_forward_pass_in_bfloat16_and_reports_what_runs(tmp_path):
    records, probes, stdout = run(tmp_path, "bf16", "train.max_steps=4", "train.precision=bf16",
                                  "+compress=dgc", "compress.warmup_epochs=null")
    for probe in probes:
        assert probe["forward_dtypes"] == ["torch.bfloat16"], probe  # autocast was active
        assert probe["scales"] == []  # no loss scaling in bf16
    summary = records[-1]
    assert summary["precision"] == "bf16" and summary["step"] == 4
    assert all(math.isfinite(v) for v in losses(records).values())
    assert summary["last_step_bytes_sent"] < summary["dense_bytes_per_step"] / 2  # DGC did run
    # Output: the console starts with one line saying what runs; the config is in the run folder.
    first = stdout.splitlines()[0]
    assert "training CNN" in first and "2 ranks" in first and "bf16" in first, first
    assert "DGC: density 0.001" in first and "config.yaml" in first
    assert "\nseed: 0\n" not in stdout  # no config dump on the console
    config = (tmp_path / "bf16" / "config.yaml").read_text()
    assert "precision: bf16" in config and "${" not in config  # resolved


@pytest.mark.timeout(900)
def test_fp32_forward_stays_float32(tmp_path):
    records, probes, _ = run(tmp_path, "fp32", "train.max_steps=2", "train.checkpoint.dir=null")
    assert all(p["forward_dtypes"] == ["torch.float32"] for p in probes)
    assert records[-1]["precision"] == "32" and "loss_scale" not in records[-1]


@pytest.mark.timeout(900)
def test_fp16_skips_overflowing_steps_and_dgc_keeps_its_residuals(tmp_path):
    """An initial loss scale of 2^24 overflows float16: GradScaler skips those steps and halves the
    scale until the gradients fit, then grows it again every 3 good steps.  DGC must hand the
    overflow on (``nonfinite="propagate"``, set by the loop: with the config's "raise" backward()
    would raise), keep finite residuals, and train."""
    init = 2.0**24
    records, probes, _ = run(tmp_path, "fp16", "train.max_steps=14", "train.precision=fp16",
                             f"train.loss_scale={init}", "train.loss_scale_growth_interval=3",
                             "+compress=dgc", "compress.warmup_epochs=null",
                             "train.checkpoint.every_steps=14")
    for probe in probes:
        assert probe["forward_dtypes"] == ["torch.float16"], probe
    scales = probes[0]["scales"]
    assert probes[1]["scales"] == scales  # every rank took the same decisions
    assert len(scales) == 14
    before = [init, *scales[:-1]]
    skipped = sum(b > a for b, a in zip(before, scales, strict=True))
    grown = sum(b < a for b, a in zip(before, scales, strict=True))
    assert scales[0] == init / 2 and skipped >= 2 and grown >= 1, scales
    summary = records[-1]
    assert summary["precision"] == "fp16" and summary["skipped_steps"] == skipped
    assert summary["loss_scale"] == scales[-1]
    steps = {r["step"]: r for r in records if r["event"] == "step"}
    assert [steps[s]["loss_scale"] for s in sorted(steps)] == scales
    assert all(math.isfinite(r["loss"]) for r in steps.values())
    assert summary["last_step_bytes_sent"] < summary["dense_bytes_per_step"] / 2  # sparse steps ran
    folder = tmp_path / "fp16" / "checkpoints" / "step-00000014"
    common = torch.load(folder / "common.pt", weights_only=True)
    assert common["precision"]["scaler"]["scale"] == scales[-1]
    assert all(torch.isfinite(v).all() for v in common["model"].values() if v.is_floating_point())
    for rank in (0, 1):
        state = torch.load(folder / f"rank-{rank:05d}.pt", weights_only=True)["comm"]["dgc"]
        assert state["config"]["nonfinite"] == "propagate"
        residuals = [m["residual"] for k, m in state.items() if isinstance(m, dict) and
                     "residual" in m]
        assert residuals and all(torch.isfinite(r).all() for r in residuals)
        assert any(r.abs().sum() > 0 for r in residuals)  # something waits to be sent


@pytest.mark.timeout(900)
def test_fp16_with_a_quantized_compressor_skips_instead_of_raising(tmp_path):
    """compress=int8's config says nonfinite=raise: under fp16 the loop sets propagate, so the
    overflowing first steps are skipped (with raise, backward() would fail at step 1)."""
    records, probes, _ = run(tmp_path, "int8", "train.max_steps=6", "train.precision=fp16",
                             f"train.loss_scale={2.0**24}", "+compress=int8",
                             "train.checkpoint.dir=null", dtypes=False)
    scales = probes[0]["scales"]
    assert probes[1]["scales"] == scales and scales[:2] == [2.0**23, 2.0**22], scales
    summary = records[-1]
    assert summary["compress"] == "int8" and summary["skipped_steps"] >= 2
    assert all(math.isfinite(v) for v in losses(records).values())
    assert math.isfinite(summary["test_loss"])


@pytest.mark.timeout(900)
def test_compiled_ddp_model_gives_the_eager_losses(tmp_path):
    common = ("train.max_steps=4", "train.checkpoint.dir=null", "+compress=dgc",
              "compress.warmup_epochs=null")
    eager, _, _ = run(tmp_path, "eager", *common)
    compiled, probes, _ = run(tmp_path, "compiled", *common, "train.compile=true",
                              "train.compile_backend=aot_eager", dtypes=False)
    for probe in probes:
        assert probe["compiled"] == [{"given": "DistributedDataParallel",
                                      "returned": "OptimizedModule", "backend": "aot_eager"}]
        assert probe["unique_graphs"][0] >= 1  # dynamo did compile the forward
    assert compiled[-1]["compiled"] is True
    a, b = losses(eager), losses(compiled)
    assert sorted(b) == [1, 2, 3, 4]
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-6)
    assert compiled[-1]["last_step_bytes_sent"] == eager[-1]["last_step_bytes_sent"]


@pytest.mark.timeout(600)
def test_a_failing_compile_backend_is_a_clear_error(tmp_path):
    """One process (no torchrun); a backend that always fails (registered by the probe worker)."""
    cmd = [sys.executable, str(WORKER), *QUICK, f"hydra.run.dir={tmp_path / 'run'}",
           "train.max_steps=1", "train.compile=true", "train.compile_backend=probe_failing_backend"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
           "TRAIN_PROBE_RECORD": str(tmp_path / "probe")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "CompileError: train.compile=true: torch.compile(backend='probe_failing_backend') " \
        "failed" in proc.stderr, proc.stderr[-3000:]
    assert "train.compile=false" in proc.stderr


def _fp16_precision(**kw):
    from dgc.training.precision import Precision
    from dgc.training.schema import TrainConfig

    return Precision(TrainConfig(precision="fp16", **kw), torch.device("cpu"))


def test_fp16_gradients_reach_the_hooks_and_communication_unscaled():
    """Communication and DGC's memory see true-unit gradients (the scale is taken off the moment a
    gradient is complete); the optimizer step equals float32 SGD on the same gradient."""
    from dgc.training.runtime import DDPRuntime

    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 4)
    model = torch.nn.Linear(8, 4)
    model.load_state_dict(ref.state_dict())
    precision = _fp16_precision(loss_scale=2.0**10)
    precision.attach(model)
    seen: list[torch.Tensor] = []
    model.weight.register_hook(lambda g: seen.append(g.clone()))  # like DDP's, after attach
    x = torch.randn(16, 8)
    ref(x).square().mean().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with precision.autocast():
        loss = model(x).float().square().mean()
    precision.backward(loss)
    assert torch.allclose(seen[0], ref.weight.grad, rtol=2e-2, atol=1e-4)  # not 1024x
    assert precision.step(opt, model.parameters(), DDPRuntime(), grad_clip=None)
    assert precision.loss_scale == 2.0**10 and precision.skipped_steps == 0
    expected = ref.weight.detach() - 0.1 * ref.weight.grad
    assert torch.allclose(model.weight.detach(), expected, rtol=2e-2, atol=1e-4)


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    from dgc.training.runtime import DDPRuntime

    model = torch.nn.Linear(4, 2)
    before = model.weight.detach().clone()
    precision = _fp16_precision(loss_scale=2.0**8)
    precision.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with precision.autocast():
        loss = (model(torch.full((2, 4), 1e4)).float() * float("inf")).sum()
    precision.backward(loss)
    assert not precision.step(opt, model.parameters(), DDPRuntime(), grad_clip=1.0)
    assert precision.loss_scale == 2.0**7 and precision.skipped_steps == 1
    assert torch.equal(model.weight.detach(), before)
