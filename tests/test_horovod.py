"""dgc.horovod.DistributedOptimizer under real ``horovodrun --gloo -np 2`` processes.

The multi-process scenarios live in ``tests/horovod_workers/worker.py``; rank 0 writes what it measured
to a JSON file that these tests check.  Without Horovod the tests skip, unless ``DGC_REQUIRE_HOROVOD=1``
(set by ``.ci/run``), where they fail: CI must never pass by skipping them.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "horovod_workers" / "worker.py"
REQUIRED = os.environ.get("DGC_REQUIRE_HOROVOD") == "1"
RUN_TIMEOUT = 120  # seconds per horovodrun launch (each takes ~15 s on 2 cores)


def _horovod_error() -> str | None:
    """None when ``horovod.torch`` imports with its PyTorch extension, else why not."""
    try:
        import horovod.torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return f"{type(exc).__name__}: {exc}"
    return None


def _need_horovod() -> None:
    err = _horovod_error()
    if err is None:
        return
    why = f"Horovod with PyTorch is not importable ({err}); run `bash launch/install_horovod.sh`"
    if REQUIRED:
        pytest.fail(f"DGC_REQUIRE_HOROVOD=1 but {why}", pytrace=False)
    pytest.skip(why)


def _horovodrun() -> list[str]:
    local = Path(sys.executable).parent / "horovodrun"
    if local.exists():
        return [str(local)]
    found = shutil.which("horovodrun")
    if found:
        return [found]
    return [sys.executable, "-c", "from horovod.runner.launch import run_commandline; run_commandline()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_scenario(name: str, tmp_path: Path) -> dict:
    """Run one worker scenario under ``horovodrun --gloo -np 2``; returns rank 0's figures."""
    _need_horovod()
    out = tmp_path / f"{name}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    env["OMP_NUM_THREADS"] = "1"
    env["DGC_TEST_PORT"] = str(_free_port())
    cmd = [
        *_horovodrun(),
        "--gloo",
        "-np",
        "2",
        "-H",
        "localhost:2",
        sys.executable,
        str(WORKER),
        name,
        str(out),
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or "")[-3000:] if isinstance(exc.stdout, str) else ""
        pytest.fail(f"horovodrun scenario {name!r} timed out after {RUN_TIMEOUT}s\n{tail}")
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"horovodrun scenario {name!r} failed (rc={proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    return result


# ----------------------------------------------------------------------- in-process (no horovodrun)
def test_import_dgc_does_not_import_horovod() -> None:
    code = "import sys, dgc; assert 'horovod' not in sys.modules, 'import dgc pulled in horovod'"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_missing_horovod_raises_import_error_pointing_to_the_installer(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "horovod", None)  # makes `import horovod...` fail
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    monkeypatch.delitem(sys.modules, "dgc.horovod", raising=False)
    with pytest.raises(ImportError, match=r"launch/install_horovod\.sh"):
        importlib.import_module("dgc.horovod")
    monkeypatch.delitem(sys.modules, "dgc.horovod", raising=False)


def test_momentum_applied_twice_is_rejected() -> None:
    _need_horovod()
    import dgc.horovod

    model = torch.nn.Linear(4, 4)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum would be applied twice"):
        dgc.horovod.DistributedOptimizer(sgd, model.named_parameters(), config=dgc.DGCConfig())
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        dgc.horovod.DistributedOptimizer(
            dgc.DGCSGD(model.parameters()), model.named_parameters(), backward_passes_per_step=0
        )
    with pytest.raises(ValueError, match="not in named_parameters"):
        dgc.horovod.DistributedOptimizer(
            dgc.DGCSGD(model.parameters()), [("weight", model.weight)]
        )


# ------------------------------------------------------------------- horovodrun --gloo -np 2
@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_density_one_momentum_zero_equals_horovod_allreduce(tmp_path: Path) -> None:
    r = run_scenario("dense", tmp_path)
    assert r["sparse_steps"] >= 3, r  # the allgather path ran, not only the dense warm-up
    assert r["moved"] > 1e-2, r  # training changed the parameters
    assert max(r["max_diff_per_step"]) <= 1e-6, r


@pytest.fixture(scope="module")
def invariant(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``invariant`` launch, checked by the tests below (each launch costs ~15 s)."""
    return run_scenario("invariant", tmp_path_factory.mktemp("invariant"))


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_conservation_invariant_sync_semantics_and_checkpoint(invariant: dict) -> None:
    r = invariant
    assert r["sparse_steps"] >= 5, r
    assert r["residual_norm"] > 1e-3, r  # a real residual was carried (density 0.05)
    assert r["max_rel_err"] <= 1e-5, r  # sent + residual == sum of momentum-corrected gradients
    assert "zero_grad() was called after loss.backward()" in r["zero_grad_error"], r
    assert r["skip_synchronize_warnings"] == 0, r
    assert r["checkpoint_ok"], r  # state_dict() carried momentum, residual and step


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_synchronize_then_plain_step_does_not_send_twice(invariant: dict) -> None:
    """synchronize(); step() (no skip_synchronize) == synchronize(); skip_synchronize: step()."""
    r = invariant["sync_then_step"]
    assert r["steps"] == [7, 7], r  # one DGC step per training step, not two
    assert max(r["max_diff_per_step"]) == 0.0, r  # nothing went through momentum/residual twice
    assert r["warnings"] == 7, r  # Horovod's slowdown warning, once per step() after synchronize()
    # synchronize() right after step(), with no backward (hvd.broadcast_optimizer_state): a real step.
    assert r["step_after_extra_synchronize"] == 8, r


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_collectives_are_in_flight_after_backward(invariant: dict) -> None:
    """Before synchronize(), every compressed tensor's collective was launched from its hook."""
    compressed, small = invariant["compressed"], ["fc1.bias", "fc2.bias"]
    assert compressed == ["fc1.weight", "fc2.weight"], invariant
    for step, kinds in enumerate(invariant["in_flight_after_backward"]):
        # dense_steps=1: step 0 allreduces the large tensors, then every step allgathers their pairs.
        launched = "allreduce" if step == 0 else "allgather"
        idle = "allgather" if step == 0 else "allreduce"
        assert kinds[launched] == compressed and kinds[idle] == [], (step, kinds)
        assert kinds["grouped"] == small and kinds["other"] == [], (step, kinds)


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_small_tensors_go_in_one_allreduce_per_dtype(invariant: dict) -> None:
    def check(per_step: list[list[dict]], large: list[str], groups: dict[str, int]) -> None:
        for step, calls in enumerate(per_step):
            grouped = {c["dtype"]: c["numel"] for c in calls if c["name"].startswith("dgc.group.")}
            assert grouped == groups, (step, calls)  # one per dtype, holding every small tensor
            assert len([c for c in calls if c["name"].startswith("dgc.group.")]) == len(groups), calls
            others = sorted(c["name"] for c in calls if not c["name"].startswith("dgc.group."))
            prefix = "dgc.dense." if step == 0 else "dgc."
            assert others == sorted(prefix + n for n in large), (step, calls)

    check(invariant["collectives"], ["fc1.weight", "fc2.weight"], {"torch.float32": 64 + 4})
    # float32 bias + two float64 vectors: one allreduce each for float32 and float64.
    check(invariant["mixed_dtype_collectives"], ["fc.weight"], {"torch.float32": 64, "torch.float64": 128})


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_too_many_backward_passes_raises(invariant: dict) -> None:
    msg = invariant["too_many_backward_error"]
    assert "Gradients were computed more than backward_passes_per_step times" in msg, msg
    assert "backward_passes_per_step=2" in msg and "increase backward_passes_per_step" in msg, msg


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_nonfinite_gradient_on_one_rank(tmp_path: Path) -> None:
    r = run_scenario("nonfinite", tmp_path)
    for mode in ("raise", "propagate"):
        m = r[mode]
        assert m["failures"] == [0, 2], r  # both ranks saw the failure of rank 1, at those steps only
        assert m["residual_finite"] and m["params_finite"], r
        assert m["unchanged"], r
        assert m["step"] == 3, r  # the two failed steps are not counted (they are retried)
    partial = r["partial"]
    assert partial["failures"] == [3], r  # one tensor's NaN on rank 1 fails the step everywhere
    assert partial["max_rel_err"] < 1e-5, r  # ... and every tensor's sent values went back into v


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
@pytest.mark.parametrize("scenario", ["ddp", "ddp_accumulate", "ddp_pruned"])
def test_horovod_and_ddp_hook_give_the_same_parameters(tmp_path: Path, scenario: str) -> None:
    r = run_scenario(scenario, tmp_path)
    assert r["steps"][0] == r["steps"][1], r
    assert r["densities"][-1] < 0.1, r  # the run reached the sparse phase after the warm-up
    assert r["moved"] > 1e-2, r
    assert max(r["max_diff_per_step"]) <= 1e-5, r
    assert r["residual_diff"] <= 1e-5, r
    h_sent, d_sent = r["elements_sent"]
    assert h_sent == d_sent, r  # the same elements travel on both transports
    if scenario == "ddp_pruned":  # pruned coordinates travel on neither, dense steps included
        assert r["at_pruned"] == 0.0, r
        full = 64 * 16 + 64 + 4 * 64 + 4
        assert h_sent[0] == full - (64 * 16 - r["live"]["fc1.weight"]) - (64 - r["live"]["fc1.bias"]), r
