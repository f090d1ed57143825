"""dgc.quant's two-phase exchange on real gloo process groups (2, 3 and 4 ranks), through DDP.

The model's loss is ``sum(p * t)``, so each rank's local gradient is exactly the tensor ``t`` it
draws, and the dense average is known: what DDP hands back can be compared with it element by
element.  DDP puts all parameters in one bucket at the first step and rebuilds them into two
buckets (``bucket_cap_mb=0.25``) from the second on.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dgc.quant import QuantConfig, QuantState, quant_hook

pytestmark = pytest.mark.timeout(400)

SHAPES = [(200, 500), (500,), (100, 400), (400,), (60001,)]  # 200,901 elements
NUMEL = sum(math.prod(s) for s in SHAPES)


class Probe(nn.Module):
    """``forward(targets) = sum(p * t)``: the local gradient of p is t."""

    def __init__(self) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in SHAPES])

    def forward(self, targets: list[torch.Tensor]) -> torch.Tensor:
        return sum((p * t).sum() for p, t in zip(self.ps, targets, strict=True))


def _targets(step: int, rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(s, generator=g) * (1 + i) for i, s in enumerate(SHAPES)]


def _setup(config: QuantConfig) -> tuple[Probe, DDP, QuantState]:
    model = Probe()
    ddp = DDP(model, bucket_cap_mb=0.25)
    state = QuantState(config, model.named_parameters())
    ddp.register_comm_hook(state, quant_hook)
    return model, ddp, state


def _step(model: Probe, ddp: DDP, targets: list[torch.Tensor]) -> torch.Tensor:
    """One backward; the averaged gradient DDP delivered, flat."""
    for p in model.parameters():
        p.grad = None
    ddp(targets).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _dense_average(targets: list[torch.Tensor], world: int) -> torch.Tensor:
    flat = torch.cat([t.reshape(-1) for t in targets])
    dist.all_reduce(flat)
    return flat / world


def _flat_residual(state: QuantState, model: Probe) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    return torch.cat([state.residuals.get(n, torch.zeros(p.numel()))
                      for n, p in zip(names, model.parameters(), strict=True)])


# ------------------------------------------------------------------------ worker: exchange
def _exchange_worker(rank: int, world: int, configs: dict[str, QuantConfig], steps: int) -> dict:
    out = {}
    for key, config in configs.items():
        model, ddp, state = _setup(config)
        delivered, dense, local_sum = [], [], torch.zeros(NUMEL)
        for step in range(steps):
            targets = _targets(step, rank)
            delivered.append(_step(model, ddp, targets))
            dense.append(_dense_average(targets, world))
            local_sum += torch.cat([t.reshape(-1) for t in targets])
        out[key] = {"delivered": torch.stack(delivered), "dense": torch.stack(dense),
                    "residual": _flat_residual(state, model), "local_sum": local_sum,
                    "stats": state.stats.to_dict(), "network": state.network_bytes,
                    "step": state.step, "max_local": max(float(t.abs().max()) for t in
                                                         _targets(0, rank))}
    dist.barrier()
    return out


CONFIGS = {
    "int8": QuantConfig(method="int8"),
    "int8_no_feedback": QuantConfig(method="int8", error_feedback=False),
    "terngrad": QuantConfig(method="terngrad"),
    "qsgd": QuantConfig(method="qsgd"),
}


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def exchanged(request):
    world = request.param
    return world, run_distributed(_exchange_worker, world, CONFIGS, 12, timeout=360)


def test_every_rank_gets_the_same_gradient(exchanged):
    _, results = exchanged
    for key in CONFIGS:
        for r in results[1:]:
            assert torch.equal(r[key]["delivered"], results[0][key]["delivered"]), key


def test_one_step_equals_the_dense_average_to_the_quantization_bound(exchanged):
    """First step (no residual yet): phase 1 loses at most half a level of a worker's block, phase
    2 half a level of the average's; a level is max|g|/127 for int8, max|g| for TernGrad and at
    most sqrt(chunk) max|g| / s for QSGD."""
    world, results = exchanged
    m = max(r["int8"]["max_local"] for r in results)
    level = {"int8": m / 127, "terngrad": m, "qsgd": math.sqrt(512) * m / 7}
    for key in ("int8", "terngrad", "qsgd"):
        err = (results[0][key]["delivered"][0] - results[0][key]["dense"][0]).abs().max()
        bound = level[key] * ((world - 1) / world * 0.5 + 0.5) * (1 + 1e-5)
        assert err <= bound, (key, float(err), bound)
    # int8 is close element by element: mean error far below the bound, and far below TernGrad's
    err8 = (results[0]["int8"]["delivered"] - results[0]["int8"]["dense"]).abs().mean()
    err2 = (results[0]["terngrad"]["delivered"] - results[0]["terngrad"]["dense"]).abs().mean()
    assert err8 < 0.25 * level["int8"] and err8 < 0.1 * err2


def test_nothing_is_lost_summed_over_ranks(exchanged):
    """N * sum of what was delivered + every rank's residual == every gradient ever computed."""
    world, results = exchanged
    for key in ("int8", "terngrad", "qsgd"):
        total = sum(r[key]["local_sum"] for r in results)
        kept = world * results[0][key]["delivered"].sum(dim=0) + sum(r[key]["residual"] for r in results)
        assert torch.allclose(kept, total, rtol=0, atol=2e-3 * float(total.abs().max())), key
        assert results[0][key]["step"] == 12


def test_int8_with_error_feedback_converges_to_the_dense_sum(exchanged):
    """Over 12 steps the cumulative error of int8 + error feedback stays one step's rounding
    (it is minus the mean residual); without feedback it grows like sqrt(steps)."""
    world, results = exchanged
    cum = {k: (results[0][k]["delivered"] - results[0][k]["dense"]).sum(dim=0)
           for k in ("int8", "int8_no_feedback")}
    mean_residual = sum(r["int8"]["residual"] for r in results) / world
    assert torch.allclose(cum["int8"], -mean_residual, atol=1e-3)
    m = max(r["int8"]["max_local"] for r in results)
    assert cum["int8"].abs().max() <= 2 * m / 127  # not 12 steps' worth
    assert cum["int8"].norm() < 0.5 * cum["int8_no_feedback"].norm()
    assert not results[0]["int8_no_feedback"]["residual"].any()  # no state without feedback


# ------------------------------------------------------------------------ worker: bytes on 4 ranks
def _bytes_worker(rank: int, world: int, methods: list[str]) -> dict:
    out = {}
    for method in methods:
        model, ddp, state = _setup(QuantConfig(method=method))
        for step in range(2):  # the second step runs on the rebuilt (two) buckets
            _step(model, ddp, _targets(step, rank))
        out[method] = {"stats": state.stats.to_dict(), "network": state.network_bytes}
    dist.barrier()
    return out


@pytest.mark.timeout(300)
def test_bytes_per_worker_on_four_ranks():
    """Counted by the hook on 4 real gloo ranks, against a ring allreduce of float32 gradients,
    which puts 2 (N-1)/N * n * 4 bytes per worker on the network; the same ratio holds for the
    payload (bytes handed to the collectives, n * 4 for the allreduce)."""
    world = 4
    results = run_distributed(_bytes_worker, world, ["int8", "terngrad", "qsgd"], timeout=240)
    ring = 2 * (world - 1) / world * NUMEL * 4
    need = {"int8": 3.5, "terngrad": 12.0, "qsgd": 6.0}
    for method, ratio in need.items():
        for r in results:
            s = r[method]["stats"]
            assert s["dense_bytes"] == NUMEL * 4 and s["elements_sent"] == NUMEL
            assert ring / r[method]["network"] >= ratio, (method, ring / r[method]["network"])
            assert s["dense_bytes"] / s["bytes_sent"] >= ratio, method
            # received: the all-to-all's and the all-gather's N messages, ~ 2 n bits / 8
            assert s["bytes_received"] == 2 * s["bytes_sent"]
    bits = {"int8": 8, "terngrad": 2, "qsgd": 4}
    for method, b in bits.items():  # ~ n * bits / 8 plus a float32 scale per 512 elements
        ideal = NUMEL * (b + 32 / 512) / 8
        assert ideal <= results[0][method]["stats"]["bytes_sent"] <= 1.01 * ideal + 64 * world


# ------------------------------------------------------------------------ worker: non-finite, resume
def _nonfinite_worker(rank: int, world: int, nonfinite: str) -> dict:
    model, ddp, state = _setup(QuantConfig(method="int8", nonfinite=nonfinite))
    _step(model, ddp, _targets(0, rank))
    _step(model, ddp, _targets(1, rank))
    before = {n: r.clone() for n, r in state.residuals.items()}
    bad = _targets(2, rank)
    if rank == 1:
        bad[0][3, 7] = float("nan")  # ps.0 is in the last bucket: bucket 0 was already exchanged
    error = None
    try:
        grads = _step(model, ddp, bad)
    except FloatingPointError as e:
        error = f"{type(e).__name__}: {e}"
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    after = {n: r.clone() for n, r in state.residuals.items()}
    out = {"error": error, "grads": grads, "before": before, "after": after, "step": state.step,
           "targets": dict(zip([n for n, _ in model.named_parameters()], bad, strict=True))}
    if nonfinite == "propagate":  # training goes on
        out["next"] = _step(model, ddp, _targets(3, rank))
        out["next_step"] = state.step
    dist.barrier()
    return out


@pytest.mark.parametrize("nonfinite", ["raise", "propagate"])
def test_nonfinite_gradient_fails_the_step_everywhere_and_keeps_the_residuals(nonfinite):
    results = run_distributed(_nonfinite_worker, 2, nonfinite, timeout=200)
    for rank, r in enumerate(results):
        assert r["step"] == 2  # the failed step is not counted
        if nonfinite == "raise":
            assert "NonFiniteGradientError" in r["error"] and "rank(s) [1]" in r["error"]
            assert not r["grads"].any()  # zero on every rank
        else:
            assert r["error"] is None and torch.isnan(r["grads"]).all()
            assert torch.isfinite(r["next"]).all() and r["next_step"] == 3
        kept, dropped = [], []
        for name, t in r["targets"].items():
            assert torch.isfinite(r["after"][name]).all()
            if torch.equal(r["after"][name], r["before"][name]):
                dropped.append(name)
            else:  # what it had sent of the step is back: residual = old residual + gradient
                assert torch.equal(r["after"][name], r["before"][name] + t.reshape(-1)), name
                kept.append(name)
        if rank == 0:
            assert not dropped  # a finite rank keeps its whole gradient
        else:
            assert "ps.0" in dropped and kept  # its non-finite bucket dropped, the other undone


def _resume_worker(rank: int, world: int) -> dict:
    config = QuantConfig(method="qsgd", error_feedback=True)
    model, ddp, state = _setup(config)
    for step in range(3):
        _step(model, ddp, _targets(step, rank))
    saved = state.state_dict()
    straight = _step(model, ddp, _targets(3, rank))
    model2, ddp2, state2 = _setup(config)
    # Shards follow DDP's buckets, which are rebuilt after the first step: one step of zero
    # gradients (nothing to keep) gives the new DDP the same buckets before the load.
    _step(model2, ddp2, [torch.zeros(s) for s in SHAPES])
    state2.load_state_dict(saved)
    resumed = _step(model2, ddp2, _targets(3, rank))
    fresh_model, fresh_ddp, _ = _setup(config)
    fresh = _step(fresh_model, fresh_ddp, _targets(3, rank))
    dist.barrier()
    return {"straight": straight, "resumed": resumed, "fresh": fresh}


def test_state_dict_resumes_bit_for_bit():
    """Same buckets, same residuals: the same gradients; without the residuals they differ."""
    for r in run_distributed(_resume_worker, 2, timeout=200):
        assert torch.equal(r["straight"], r["resumed"])
        assert not torch.equal(r["straight"], r["fresh"])  # the residuals mattered


# ------------------------------------------------------------------------ the main job
@pytest.mark.timeout(900)
@pytest.mark.parametrize("option,ratio", [("int8", 3.5), ("terngrad", 12.0), ("qsgd", 6.0)])
def test_two_rank_run_of_the_main_job(tmp_path, option, ratio):
    """launch/train.py under torchrun with +compress=<option>: trains, counts its bytes, saves."""
    from test_train_runs import run_train, steps

    records = run_train(tmp_path / "run", "train.max_steps=3", f"+compress={option}")
    by_step = steps(records)
    assert sorted(by_step) == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in by_step.values())
    summary = records[-1]
    assert summary["compress"] == option and summary["world_size"] == 2
    for r in by_step.values():  # every step quantized (no dense warm-up), all elements sent
        assert r["dense_bytes_per_step"] / r["bytes_sent_per_step"] >= ratio
        assert r["achieved_density"] == 1.0
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
