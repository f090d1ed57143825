"""The DDP hook in real multi-process gloo groups (2 and 4 ranks)."""

from __future__ import annotations

import pytest
import torch
from _dist import run_distributed
from ddp_workers import Scenario, run_scenario

pytestmark = pytest.mark.timeout(240)


def _run_all(world: int, scenarios: list[Scenario]) -> list[list[dict]]:
    return run_distributed(_scenarios_worker, world, scenarios, timeout=200)


def _scenarios_worker(rank: int, world: int, scenarios: list[Scenario]) -> list[dict]:
    return [run_scenario(rank, world, sc) for sc in scenarios]


def _assert_close_params(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


def _assert_identical_across_ranks(results: list[dict]) -> None:
    for r in results[1:]:
        for n, p in results[0]["params"].items():
            assert torch.equal(p, r["params"][n]), f"parameter {n} differs between ranks"


@pytest.fixture(scope="module")
def two_rank_results() -> list[list[dict]]:
    sparse = dict(density=0.05, momentum=0.9, min_compress_numel=16, dense_steps=2)
    scenarios = [
        # 0: plain DDP, plain SGD
        Scenario(dgc=None, opt="sgd"),
        # 1: density 1, momentum 0 must equal plain allreduce
        Scenario(dgc=dict(density=1.0, momentum=0.0, min_compress_numel=16)),
        # 2: plain DDP + SGD(momentum, weight decay)
        Scenario(dgc=None, opt="sgd_momentum_wd"),
        # 3: DGC density 1 with momentum correction, no masking, weight decay in the config = SGD momentum
        Scenario(
            dgc=dict(density=1.0, momentum=0.9, momentum_masking=False, weight_decay=0.01, min_compress_numel=16)
        ),
        # 4: sparse, several buckets, exact invariant
        Scenario(model="conv", dgc=dict(sparse), steps=6, bucket_cap_mb=0.01),
        # 5: sparse + gradient_as_bucket_view + static_graph + nesterov + fp16 wire
        Scenario(
            model="conv",
            dgc=dict(sparse, nesterov=True, value_dtype="float16"),
            bucket_cap_mb=0.01,
            gradient_as_bucket_view=True,
            static_graph=True,
        ),
        # 6: sparse + no_sync accumulation + unused parameters + warm-up
        Scenario(
            model="conv",
            dgc=dict(sparse, warmup_steps=4, density=0.01),
            accumulate=3,
            find_unused=True,
            steps=7,
        ),
        # 7: bfloat16 gradients (state in float32)
        Scenario(model="conv", dgc=dict(sparse), dtype="bfloat16", bucket_cap_mb=0.01),
        # 8: float16 gradients, momentum 0 (top-k with error feedback) with SGD momentum
        Scenario(model="conv", dgc=dict(sparse, momentum=0.0), dtype="float16", opt="sgd_momentum"),
        # 9: non-finite gradient on rank 1 at step 3 -> FloatingPointError everywhere, residuals kept
        Scenario(model="conv", dgc=dict(sparse), nan_at=(3, 1), bucket_cap_mb=0.01),
        # 10: nonfinite="propagate": NaN grads for that step, then training goes on
        Scenario(model="conv", dgc=dict(sparse, nonfinite="propagate"), nan_at=(3, 0), steps=6),
        # 11/12: checkpoint mid-run == uninterrupted
        Scenario(model="conv", dgc=dict(sparse), steps=6, check_invariant=False),
        Scenario(model="conv", dgc=dict(sparse), steps=6, check_invariant=False, checkpoint_at=4),
        # 13/14: scenario 4 with each index format forced (4 is "auto")
        Scenario(model="conv", dgc=dict(sparse, index_format="int32"), steps=6, bucket_cap_mb=0.01),
        Scenario(model="conv", dgc=dict(sparse, index_format="block16"), steps=6, bucket_cap_mb=0.01),
        # 15: scenario 9 (undo after a NaN on another rank) with int32 positions
        Scenario(model="conv", dgc=dict(sparse, index_format="int32"), nan_at=(3, 1), bucket_cap_mb=0.01),
        # 16: NaN in ONE parameter's gradient: its bucket fails, the others were delivered fine and
        # must be put back too (the step is not applied)
        Scenario(model="conv", dgc=dict(sparse), nan_at=(3, 1), nan_param="c2.weight", bucket_cap_mb=0.01),
        # 17: a parameter used for 3 steps, then by no rank: DDP gives it no gradient, so what DGC
        # sends for it from its residual and momentum is given back at optimizer.step()
        Scenario(model="conv", dgc=dict(sparse), find_unused=True, extra_until=3, steps=7, bucket_cap_mb=0.01),
        # 18: the same with the plain register_comm_hook line (no dgc.register): DGCState gives it back
        Scenario(
            model="conv", dgc=dict(sparse), find_unused=True, extra_until=3, steps=7, bucket_cap_mb=0.01,
            plain_hook=True,
        ),  # fmt: skip
        # 19: policy switched sparse <-> dense mid-run (a bucket going dense sends all of v, one going
        # sparse continues from its residual), with momentum and warm-up densities
        Scenario(
            model="conv", dgc=dict(sparse, warmup_steps=4), steps=8, bucket_cap_mb=0.01,
            switch=("sparse", "sparse", "sparse", "dense", "sparse", "dense", "dense", "sparse"),
        ),  # fmt: skip
        # 20: policy="dense": momentum-corrected dense allreduce with the same state
        Scenario(model="conv", dgc=dict(sparse, policy="dense"), steps=5, bucket_cap_mb=0.01),
    ]
    return _run_all(2, scenarios)


def _scenario(results: list[list[dict]], i: int) -> list[dict]:
    return [per_rank[i] for per_rank in results]


def test_density_one_momentum_zero_equals_allreduce(two_rank_results):
    plain, dgc_run = _scenario(two_rank_results, 0), _scenario(two_rank_results, 1)
    _assert_close_params(dgc_run[0]["params"], plain[0]["params"], atol=1e-6)
    for g_dgc, g_plain in zip(dgc_run[0]["grads"], plain[0]["grads"], strict=True):
        _assert_close_params(g_dgc, g_plain, atol=1e-6)


def test_momentum_correction_and_weight_decay_match_sgd(two_rank_results):
    plain, dgc_run = _scenario(two_rank_results, 2), _scenario(two_rank_results, 3)
    _assert_close_params(dgc_run[0]["params"], plain[0]["params"], atol=1e-5)
    assert dgc_run[0]["max_rel_err"] < 1e-5


@pytest.mark.parametrize("i", [4, 5, 6, 13, 14, 17, 18])
def test_sparse_invariant_and_identical_ranks(two_rank_results, i):
    results = _scenario(two_rank_results, i)
    for r in results:
        assert r["errors"] == []
        assert r["max_rel_err"] < 1e-5, r["max_rel_err"]
    _assert_identical_across_ranks(results)
    last = results[0]["stats"][-1]
    assert last["sparse_buckets"] > 0
    assert last["achieved_density"] < 0.5


def test_sparse_really_sparse_and_bytes_counted(two_rank_results):
    results = _scenario(two_rank_results, 4)
    stats = results[0]["stats"]
    assert stats[0]["dense_buckets"] > 0 and stats[0]["sparse_buckets"] == 0  # dense steps
    last = stats[-1]
    assert last["bytes_sent"] < last["dense_bytes"] / 3
    assert last["bytes_received"] == 2 * last["bytes_sent"]


def test_warmup_density_schedule_applied(two_rank_results):
    stats = _scenario(two_rank_results, 6)[0]["stats"]
    densities = [s["density"] for s in stats]
    assert densities[:2] == [1.0, 1.0]
    assert densities[2] == pytest.approx(0.25)
    assert densities[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(densities, densities[1:]))


@pytest.mark.parametrize("i", [7, 8])
def test_half_precision_gradients(two_rank_results, i):
    results = _scenario(two_rank_results, i)
    for r in results:
        assert r["errors"] == []
        assert r["max_rel_err"] < 2e-2  # gradients themselves are rounded to 8-11 bits
        assert r["residual_finite"]
    _assert_identical_across_ranks(results)


@pytest.mark.parametrize("i", [9, 15, 16])
def test_nonfinite_raises_everywhere_and_keeps_residuals(two_rank_results, i):
    results = _scenario(two_rank_results, i)
    for r in results:
        assert len(r["errors"]) == 1 and "non-finite gradient" in r["errors"][0], r["errors"]
        assert "FloatingPointError" in r["errors"][0] or "non-finite" in r["errors"][0]
        assert r["residual_finite"]
        assert r["max_rel_err"] < 1e-5  # nothing lost: the failed step's gradient stays in v


def test_nonfinite_propagate_skips_step_and_continues(two_rank_results):
    results = _scenario(two_rank_results, 10)
    for r in results:
        assert r["errors"] == ["propagated"]
        assert r["residual_finite"]
        assert r["max_rel_err"] < 1e-5
        assert all(torch.isfinite(p).all() for p in r["params"].values())
    _assert_identical_across_ranks(results)


def test_index_formats_train_bit_identically_and_block16_is_smaller(two_rank_results):
    auto, int32, block16 = (_scenario(two_rank_results, i) for i in (4, 13, 14))
    for a, b, c in zip(auto, int32, block16, strict=True):
        _assert_close_params(a["params"], b["params"], atol=0)
        _assert_close_params(a["params"], c["params"], atol=0)
    last = {name: r[0]["stats"][-1] for name, r in (("auto", auto), ("int32", int32), ("block16", block16))}
    assert last["int32"]["elements_sent"] == last["block16"]["elements_sent"] > 0
    assert last["block16"]["bytes_sent"] < last["int32"]["bytes_sent"]
    assert last["auto"]["bytes_sent"] == last["block16"]["bytes_sent"]  # every bucket here sends > 2 pairs


def test_checkpoint_resume_equals_uninterrupted(two_rank_results):
    straight, resumed = _scenario(two_rank_results, 11), _scenario(two_rank_results, 12)
    for a, b in zip(straight, resumed, strict=True):
        _assert_close_params(a["params"], b["params"], atol=0)


def test_four_ranks_many_buckets_no_mismatch():
    """PowerSGD's own hook fails on gloo with many buckets; ours issues collectives in bucket order."""
    sc = Scenario(
        model="conv",
        dgc=dict(density=0.01, momentum=0.9, min_compress_numel=16, warmup_steps=2),
        bucket_cap_mb=0.0005,  # about one bucket per parameter
        steps=5,
    )
    results = [r[0] for r in _run_all(4, [sc])]
    for r in results:
        assert r["errors"] == []
        assert r["max_rel_err"] < 1e-5
    _assert_identical_across_ranks(results)
    last = results[0]["stats"][-1]
    assert last["sparse_buckets"] >= 5 and last["sparse_buckets"] + last["dense_buckets"] >= 6


def test_policy_switch_conserves_the_gradient_exactly(two_rank_results):
    results = _scenario(two_rank_results, 19)
    for r in results:
        assert r["errors"] == []
        assert r["max_rel_err"] < 1e-5  # sent + residuals == corrected gradients, through every switch
        kinds = [(s["sparse_buckets"] > 0, s["dense_buckets"] > 0) for s in r["stats"]]
        assert kinds[3] == (False, True) and kinds[4][0] and kinds[7][0]
    _assert_identical_across_ranks(results)


def test_policy_dense_sends_everything_through_allreduce(two_rank_results):
    results = _scenario(two_rank_results, 20)
    for r in results:
        assert r["errors"] == [] and r["max_rel_err"] < 1e-5
        assert all(s["sparse_buckets"] == 0 and s["achieved_density"] == 1.0 for s in r["stats"])
    _assert_identical_across_ranks(results)
