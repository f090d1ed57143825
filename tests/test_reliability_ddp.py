"""Misuse and faults on the DDP hook (2 gloo ranks): synchronized micro-batches, ranks that disagree,
a NaN on one rank."""

from __future__ import annotations

import pytest
import torch
from _dist import run_distributed
from reliability_workers import (
    accumulation,
    accumulation_unknown_optimizer,
    auto_policy,
    hierarchy,
    hierarchy_resume,
    mismatch,
    nan_on_one_rank,
    nan_propagate,
    node_nan,
)

pytestmark = pytest.mark.timeout(180)


def test_synchronized_micro_batches_equal_ddp_sgd_momentum_when_dense() -> None:
    # Every step dense (dense_steps > steps): DGC is momentum SGD; it used to diverge (9.5 -> 2.4e9).
    results = run_distributed(accumulation, 2, dict(momentum=0.9, dense_steps=100), timeout=150)
    for r in results:
        assert r["synchronized_step"] == 5  # optimizer steps, not hook calls
        for n, p in r["sgd"].items():
            torch.testing.assert_close(r["synchronized"][n], p, rtol=1e-5, atol=1e-6)


def test_synchronized_micro_batches_equal_no_sync_when_sparse() -> None:
    cfg = dict(density=0.05, momentum=0.9, min_compress_numel=16, dense_steps=1)
    results = run_distributed(accumulation, 2, cfg, timeout=150)
    for r in results:
        assert r["synchronized_step"] == r["no_sync_step"] == 5
        for n, p in r["no_sync"].items():
            torch.testing.assert_close(r["synchronized"][n], p, rtol=1e-5, atol=1e-6)
    for n, p in results[0]["synchronized"].items():
        assert torch.equal(p, results[1]["synchronized"][n])


def test_accumulation_before_the_optimizer_is_known_is_refused() -> None:
    for msg in run_distributed(accumulation_unknown_optimizer, 2, timeout=120):
        assert "no_sync()" in msg and "dgc.register" in msg


@pytest.mark.parametrize(
    ("field", "values"),
    [("density", [0.001, 0.01]), ("momentum", [0.9, 0.0]), ("dense_steps", [2, 3]),
     ("value_dtype", ["float32", "float16"]), ("min_compress_numel", [16, 1024])],
)
def test_ranks_with_different_configs_fail_fast_naming_the_field(field: str, values: list) -> None:
    for msg in run_distributed(mismatch, 2, field, values, timeout=60):
        assert msg.startswith("RankMismatchError"), msg
        assert f"DGCConfig.{field}" in msg and repr(values[0]) in msg and repr(values[1]) in msg


def test_nan_on_one_rank_raises_everywhere_and_keeps_ranks_identical() -> None:
    results = run_distributed(nan_on_one_rank, 2, timeout=120)
    for r in results:
        assert r["errors"] == [(2, "NonFiniteGradientError")]
        assert r["steps"] == [1, 2, 2]  # the failed step is not counted
        assert all(torch.equal(g, torch.zeros_like(g)) for g in r["grads"].values())
    for n, p in results[0]["params"].items():
        assert torch.equal(p, results[1]["params"][n]) and torch.isfinite(p).all()


def test_auto_policy_takes_the_same_decision_on_every_rank() -> None:
    a, b = run_distributed(auto_policy, 2, timeout=120)
    assert a["decisions"] == b["decisions"]
    assert a["samples"] > 0  # the dense steps were timed
    decided = [d for d in a["decisions"] if d]
    assert decided and all(len(d) >= 2 for d in decided)  # every bucket has a decision
    assert [k[0] for k in a["kinds"][:2]] == [0, 0]  # the dense steps


@pytest.mark.parametrize(
    "cfg",
    [dict(density=1.0, momentum=0.0, min_compress_numel=16, dense_steps=1),  # sparse at density 1
     dict(momentum=0.9, min_compress_numel=16, policy="dense")],  # momentum-corrected dense
)
def test_node_hierarchy_equals_flat(cfg: dict) -> None:
    results = run_distributed(hierarchy, 4, cfg, timeout=150)
    for r in results:
        for n, p in r["flat"].items():
            torch.testing.assert_close(r["node"][n], p, rtol=1e-5, atol=1e-6)
        assert r["node_sparse"] == r["flat_sparse"]
    for r in results[1:]:
        for n, p in results[0]["node"].items():
            assert torch.equal(p, r["node"][n])


def test_node_hierarchy_splits_a_big_tensor_and_equals_flat() -> None:
    cfg = dict(density=1.0, momentum=0.0, min_compress_numel=16, dense_steps=1)
    results = run_distributed(hierarchy, 4, cfg, 3, "big", timeout=150)
    for r in results:
        assert {"net1.weight[0:2560]", "net1.weight[2560:5120]"} <= set(r["node_pieces"]), r["node_pieces"]
        for n, p in r["flat"].items():
            torch.testing.assert_close(r["node"][n], p, rtol=1e-5, atol=1e-6)
        assert r["node_sparse"] == r["flat_sparse"] > 0


def test_node_hierarchy_resumes_across_another_cut_keeping_node_sums_exact() -> None:
    results = run_distributed(hierarchy_resume, 4, timeout=150)
    for r in results:
        assert r["cut_changed"] and r["exact"] and r["held"] > 0, r
        assert r["foreign"] == 0.0 and r["step"] == 4, r
        assert r["foreign_after_step"] == 0.0, r
    for r in results[1:]:
        for n, p in results[0]["params"].items():
            assert torch.equal(p, r["params"][n])


def test_node_hierarchy_receives_fewer_bytes() -> None:
    cfg = dict(density=0.01, min_compress_numel=16, dense_steps=1)
    for r in run_distributed(hierarchy, 4, cfg, timeout=150):
        assert r["node_sparse"] > 0
        assert r["node_received"] < r["flat_received"]


def test_node_hierarchy_with_int8_values_tracks_flat() -> None:
    # int8 rounds node averages instead of local gradients, so only close: the rounding stays in v.
    cfg = dict(density=1.0, momentum=0.0, min_compress_numel=16, dense_steps=1, value_dtype="int8")
    for r in run_distributed(hierarchy, 4, cfg, timeout=150):
        assert r["node_sparse"] > 0
        for n, p in r["flat"].items():
            torch.testing.assert_close(r["node"][n], p, rtol=0, atol=2e-3)


def test_nan_with_propagate_hands_nan_everywhere_and_is_not_counted() -> None:
    for r in run_distributed(nan_propagate, 2, timeout=120):
        assert r["all_nan"] == [False, False, True, False]  # every gradient of the failed step, every rank
        assert r["steps"] == [1, 2, 2, 3]


@pytest.mark.parametrize(
    "cfg",
    [dict(density=0.05, min_compress_numel=16, dense_steps=1),  # sparse shares
     dict(min_compress_numel=16, policy="dense")],  # dense buckets: the zero-padded whole buffer
    ids=["sparse", "dense"],
)
def test_node_hierarchy_nan_in_a_foreign_or_own_share_fails_the_step_everywhere(cfg: dict) -> None:
    # Each rank checks the finiteness of its own share only: a NaN in a share rank 1 does not own reaches
    # that share's owner (rank 0) through the node sum, whose check must fail the step on every rank.
    bad = {2: "foreign", 4: "owned"}
    results = run_distributed(node_nan, 4, cfg, bad, timeout=150)
    for rank, r in enumerate(results):
        assert r["all_nan"] == [False, False, True, False, True, False], rank  # every rank, both steps
        assert r["steps"] == [1, 2, 2, 3, 3, 4]  # the failed steps are not counted
        for step, kind in bad.items():
            assert r["state_finite"][step], (rank, step)  # no NaN entered any u or v
            (at, nan_range) = r["nan_at"][step]
            owner = 0 if kind == "foreign" else 1
            for name, a, b, how in r["settled"][step]:
                poisoned = rank == owner and name == "net1.weight" and (a, b) == nan_range
                # the poisoned share's owner took nothing in; every other share gave back what it sent
                assert how == ("untouched" if poisoned else "restored"), (rank, step, name, a, b, how)
            assert any(n == "net1.weight" and (a, b) == nan_range for n, a, b, _ in r["settled"][step]) == (
                rank % 2 == owner)
    for r in results[1:]:
        for n, p in results[0]["params"].items():
            assert torch.equal(p, r["params"][n]) and torch.isfinite(p).all()
