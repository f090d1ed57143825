"""dgc.quant.horovod.DistributedOptimizer (int8, TernGrad, QSGD over Horovod) under real
``horovodrun --gloo`` processes (2 and 4).

The scenarios live in ``tests/horovod_workers/quant_worker.py``; rank 0 writes what it measured to
a JSON file that these tests check.  Without Horovod the tests skip, unless
``DGC_REQUIRE_HOROVOD=1`` (set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_horovod import ROOT, _free_port, _horovodrun, _need_horovod

WORKER = Path(__file__).resolve().parent / "horovod_workers" / "quant_worker.py"
RUN_TIMEOUT = 150  # seconds per launch (15-40 s each on 2 loaded cores)
NUMEL = 48 * 50 + 50 + 30 * 40 + 40 + 4001  # the worker's probe model
BITS = {"int8": 8, "terngrad": 2, "qsgd": 4}


def run_worker(scenario: str, tmp_path: Path, np: int) -> dict:
    """One worker scenario on ``np`` Horovod processes (``np=1``: one plain process, no
    horovodrun); returns rank 0's figures."""
    _need_horovod()
    out = tmp_path / f"{scenario}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DGC_TEST_PORT=str(_free_port()))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    launcher = [] if np == 1 else [*_horovodrun(), "--gloo", "-np", str(np), "-H", f"localhost:{np}"]
    cmd = [*launcher, sys.executable, str(WORKER), scenario, str(out)]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        tail = exc.stdout[-3000:] if isinstance(exc.stdout, str) else ""
        pytest.fail(f"quant worker {scenario!r} (np={np}) timed out after {RUN_TIMEOUT}s\n{tail}")
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"quant worker {scenario!r} (np={np}) failed (rc={proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    assert result["world_size"] == np
    return result


# ----------------------------------------------------------------------- in-process (no horovodrun)
def test_import_dgc_quant_does_not_import_horovod() -> None:
    code = ("import sys, dgc, dgc.quant; "
            "assert 'horovod' not in sys.modules, 'import dgc.quant pulled in horovod'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_missing_horovod_raises_import_error_pointing_to_the_installer(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "horovod", None)  # makes `import horovod...` fail
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    monkeypatch.delitem(sys.modules, "dgc.quant.horovod", raising=False)
    with pytest.raises(ImportError, match=r"dgc\.quant\.horovod needs Horovod.*install_horovod\.sh"):
        importlib.import_module("dgc.quant.horovod")
    monkeypatch.delitem(sys.modules, "dgc.quant.horovod", raising=False)


def test_bad_arguments_are_refused_with_the_fix() -> None:
    _need_horovod()
    import dgc
    import dgc.quant.horovod as qhvd

    model = torch.nn.Linear(4, 4)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        qhvd.DistributedOptimizer(model, model.named_parameters())
    with pytest.raises(TypeError, match=r"dgc\.quant\.QuantConfig.*dgc\.horovod"):
        qhvd.DistributedOptimizer(sgd, model.named_parameters(), config=dgc.DGCConfig())
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        qhvd.DistributedOptimizer(sgd, model.named_parameters(), backward_passes_per_step=0)
    with pytest.raises(ValueError, match="group_below_numel"):
        qhvd.DistributedOptimizer(sgd, model.named_parameters(), group_below_numel=0)
    with pytest.raises(ValueError, match="not in named_parameters"):
        qhvd.DistributedOptimizer(sgd, [("weight", model.weight)])


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_one_process_uses_the_gradient_exactly(tmp_path: Path) -> None:
    r = run_worker("single", tmp_path, 1)
    assert r["exact"] and r["residuals"] == 0 and r["step"] == 1, r


# ------------------------------------------------------------------- horovodrun --gloo -np 2: DDP
@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``ddp`` launch, checked by the tests below."""
    return run_worker("ddp", tmp_path_factory.mktemp("quant_ddp"), 2)


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_horovod_equals_the_ddp_hook_bit_for_bit(ddp: dict) -> None:
    """Same gradients, same buckets: the same averaged gradients and residuals, bit for bit (both
    transports run the same functions of dgc.quant.transport on the same bytes; only the
    collectives that carry the bytes differ, and they carry them exactly)."""
    cases = ddp["ddp"]
    assert sorted(cases) == sorted([f"{m}/{how}" for m in BITS for how in ("alone", "grouped")]
                                   + ["int8/accumulate"]), cases
    for key, c in cases.items():
        assert c["max_diff"] == 0.0, (key, c)
        assert c["residual"] > 1e-3 and c["varies"] > 1.0, (key, c)  # feedback and data were real


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_checkpoint_round_trip_resumes_bit_for_bit(ddp: dict) -> None:
    c = ddp["checkpoint"]
    assert c["saved_residuals"] == [f"ps.{i}" for i in range(5)], c  # state_dict()["quant"]
    assert c["resumed_step"] == 3, c
    assert c["resumed_equal"] and c["params_equal"], c
    assert c["fresh_differs"], c  # the residuals mattered


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_horovod_step_semantics(ddp: dict) -> None:
    s = ddp["semantics"]
    assert s["steps"] == [3, 3], s  # synchronize(); step() exchanges once, not twice
    assert s["max_diff"] == 0.0 and s["warnings"] == 0 and s["twin_warnings"] == 3, s
    assert s["step_after_extra_synchronize"] == 4, s  # after step(), no backward: a real step
    assert "zero_grad() was called after loss.backward()" in s["zero_grad_error"], s
    assert "backward_passes_per_step=2" in s["too_many_backward_error"], s


# ---------------------------------------------------------------- horovodrun --gloo -np 2 and 4
@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def exchanged(request, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_worker("exchange", tmp_path_factory.mktemp("quant_exchange"), request.param)


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_first_step_equals_the_dense_average_to_the_quantization_bound(exchanged: dict) -> None:
    """Phase 1 loses at most half a level of a worker's chunk, phase 2 half a level of the
    average's (a level: max|g|/127 for int8, max|g| for TernGrad, sqrt(chunk) max|g|/s for QSGD)."""
    world = exchanged["world_size"]
    m = exchanged["int8"]["max_local"]
    level = {"int8": m / 127, "terngrad": m, "qsgd": math.sqrt(512) * m / 7}
    for method, lv in level.items():
        r = exchanged[method]
        assert r["same_on_every_rank"], method
        bound = lv * ((world - 1) / world * 0.5 + 0.5) * (1 + 1e-5)
        assert 0 < r["first_err"] <= bound, (method, r["first_err"], bound)


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_nothing_is_lost_and_int8_feedback_converges_to_the_dense_sum(exchanged: dict) -> None:
    """N * (sum of the averages) + every residual == every gradient (to float rounding); without
    error feedback the same sum misses what rounding dropped.  Over 10 steps int8's running sum of
    errors stays one step's rounding (it is minus the mean residual)."""
    for method in BITS:
        r = exchanged[method]
        assert r["lost"] <= 2e-6 * exchanged["world_size"] * r["total_max"], (method, r["lost"])
        assert r["step"] == 10 and r["residual_any"], method
    plain = exchanged["int8_no_feedback"]
    assert not plain["residual_any"] and plain["lost"] > 1000 * exchanged["int8"]["lost"]
    r = exchanged["int8"]
    assert r["cum_err_max"] <= 2 * r["max_local"] / 127, r  # not 10 steps' worth
    assert r["cum_err_norm"] < 0.5 * plain["cum_err_norm"], (r, plain)


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_bytes_handed_to_horovod_stay_about_2n_bits_whatever_n(exchanged: dict) -> None:
    """Counted by wrapping hvd.alltoall_async/allgather_async/synchronize: per step and worker,
    the all-to-all takes N messages and the all-gather one per bucket; each returns N.  So a
    worker receives 2 N B ~ 2 n bits/8 and hands over (N + 1) B ~ (1 + 1/N) n bits/8."""
    n = exchanged["world_size"]
    for method, bits in BITS.items():
        r = exchanged[method]
        b = sum(r["message_bytes"].values())  # one message per bucket (4 buckets)
        for step in r["bytes"]:
            assert step["handed"] == {"alltoall": n * b, "allgather": b}, (method, step)
            assert step["received"] == {"alltoall": n * b, "allgather": n * b}, (method, step)
        received = 2 * n * b
        ideal = 2 * NUMEL * bits / 8
        assert ideal <= received <= 1.12 * ideal, (method, received / ideal)
        assert r["stats"]["bytes_sent"] == n * b and r["stats"]["bytes_received"] == received
        assert r["stats"]["dense_bytes"] == 4 * NUMEL and r["stats"]["elements_sent"] == NUMEL


# ------------------------------------------------------------------ horovodrun --gloo -np 2: NaN
@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_nonfinite_gradient_on_one_rank_fails_the_step_everywhere(tmp_path: Path) -> None:
    ranks = run_worker("nonfinite", tmp_path, 2)["ranks"]
    for rank, modes in enumerate(ranks):
        for mode, r in modes.items():
            if mode == "raise":
                assert [e[:2] for e in r["errors"]] == [[2, "NonFiniteGradientError"]], r
                assert "rank(s) [1]" in r["errors"][0][2], r
                assert r["zero_grads"] and r["unchanged"], r
            else:
                assert r["errors"] == [] and r["nan_grads"] == [[2, True]], r
            assert r["step"] == 3, r  # the failed step is not counted
            assert r["kept"] and r["residual_finite"] and r["params_finite"], r
            # rank 1's non-finite gradient is dropped; every finite one is back in its residual
            assert r["dropped"] == ([] if rank == 0 else ["ps.2"]), (rank, r)


# ------------------------------------------------------------------ the main job under horovodrun
@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
def test_main_job_under_horovod_trains_and_resumes(tmp_path: Path) -> None:
    """``horovodrun -np 2 launch/train.py dist=horovod +compress=int8``: 4 steps, 4x fewer bytes
    than the dense gradients, and a resume from step 2 repeats steps 3-4 exactly."""
    _need_horovod()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])

    def run(out: Path, *extra: str) -> dict[int, dict]:
        cmd = [*_horovodrun(), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
               str(ROOT / "launch" / "train.py"), "dist=horovod", "+compress=int8", "data=digits",
               "train.batch_size=16", "logger.log_every=1", "logger.progress=false",
               "train.max_steps=4", "train.checkpoint.every_steps=2", "train.checkpoint.keep=null",
               f"hydra.run.dir={out}", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env,
                              cwd=tmp_path)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["backend"] == "horovod" and records[-1]["compress"] == "int8"
        return {r["step"]: r for r in records if r["event"] == "step"}

    full = run(tmp_path / "full")
    assert sorted(full) == [1, 2, 3, 4]
    for r in full.values():
        assert math.isfinite(r["loss"]), r
        assert r["dense_bytes_per_step"] / r["bytes_sent_per_step"] >= 3.5, r
    resumed = run(tmp_path / "resumed", f"train.resume={tmp_path / 'full/checkpoints/step-00000002'}")
    assert sorted(resumed) == [3, 4]
    assert [resumed[s]["loss"] for s in (3, 4)] == [full[s]["loss"] for s in (3, 4)]


def test_launcher_option_accepts_horovod() -> None:
    """``+compress=int8|terngrad|qsgd`` with ``dist=horovod`` passes the option's check (and any
    other runtime is refused, naming the two it runs under)."""
    _need_horovod()
    from hydra.utils import instantiate
    from test_conf_compose import _compose

    for option in BITS:
        cfg = _compose(f"+compress={option}")
        comm = instantiate(cfg.compress)
        comm.check(dist_name="horovod", optim=cfg.optim)
        with pytest.raises(ValueError, match="dist=ddp or dist=horovod"):
            comm.check(dist_name="mpi", optim=cfg.optim)
