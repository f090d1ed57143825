"""Pruned coordinates never travel: not as pairs, and not as zeros on the dense path (dense warm-up steps,
tensors below ``min_compress_numel``); what does travel is the masked average, on 2 real gloo ranks."""

from __future__ import annotations

import pytest
import torch
from _dist import run_distributed
from ddp_workers import run_pruned_traffic


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_distributed(run_pruned_traffic, 2, 5, timeout=150)


@pytest.mark.timeout(200)
def test_pruned_coordinates_are_not_sent_on_any_path(runs):
    r = runs[0]
    live, numel = r["live"], r["numel"]
    biases = numel["0.bias"] + numel["2.bias"]
    dense_step = live["0.weight"] + live["2.weight"] + biases
    for step, stats in enumerate(r["stats"]):
        if step < 2:  # dense steps: one allreduce of the live entries
            assert stats["elements_sent"] == dense_step, (step, stats)
        else:  # 0.weight as pairs (k of its live entries), 2.weight and the biases dense, live only
            k = -(-live["0.weight"] * 5 // 100)
            assert stats["elements_sent"] == k + live["2.weight"] + biases, (step, stats)
        assert stats["elements"] == sum(numel.values())


@pytest.mark.timeout(200)
def test_pruned_coordinates_get_nothing_and_keep_no_state(runs):
    for r in runs:
        assert max(r["grad_at_pruned"]) == 0.0
        assert max(r["state_at_pruned"]) == 0.0
        for n, want in r["first_want"].items():
            torch.testing.assert_close(r["first_grad"][n], want, rtol=1e-6, atol=1e-7)
    for n, p in runs[0]["params"].items():
        assert torch.equal(p, runs[1]["params"][n]), f"{n} differs between ranks"
