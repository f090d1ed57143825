"""hierarchy="node" on the DDP hook: the share messages cross the nodes among peers only (stage A, one
all-gather per local rank with the same local rank of the other nodes), then an all-gather inside the
node (stage B).  Each test fails if the exchange went over all processes again."""

from __future__ import annotations

import pytest
import torch
from _dist import run_distributed
from node_exchange_workers import early_inside, two_stage
from reliability_workers import hierarchy

pytestmark = pytest.mark.timeout(300)


def test_two_stage_sends_n_minus_1_share_messages_across_and_decodes_the_one_stage_bits() -> None:
    # Nodes [0, 3] and [1, 2]: local rank 1's cross group {3, 2} orders the nodes the other way round,
    # so the stage-B rows are not in rank order and must be mapped.
    nodes = [[0, 3], [1, 2]]
    results = run_distributed(two_stage, 4, nodes, 4, timeout=240)
    for rank, r in enumerate(results):
        sparse = range(1, 4)  # step 0 is dense
        assert all(r["buckets"][s] >= 2 for s in sparse), r["buckets"]  # several sparse buckets
        for s in sparse:
            # (n - 1) W per sparse bucket: with n = 2 nodes, one share message each, never N - 1 = 3
            assert r["expected"][s] > 0
            assert r["across"][s] == r["counter"][s] == r["expected"][s], (rank, s, r)
            assert r["group_sizes"][s] == [2], r["group_sizes"]  # no gather over all 4 processes
            assert r["rows_equal"][s] and r["decoded_equal"][s], (rank, s)
    for r in results[1:]:
        for n, p in results[0]["params"].items():
            assert torch.equal(p, r["params"][n])


@pytest.mark.parametrize("nodes", [[[0, 5], [1, 4], [2, 3]]], ids=["3x2-interleaved"])
def test_six_processes_equal_flat_at_density_1(nodes: list[list[int]]) -> None:
    cfg = dict(density=1.0, momentum=0.0, min_compress_numel=16, dense_steps=1)
    results = run_distributed(hierarchy, 6, cfg, 3, "toy", nodes, timeout=280)
    for r in results:
        assert r["node_sparse"] == r["flat_sparse"] > 0
        for n, p in r["flat"].items():
            torch.testing.assert_close(r["node"][n], p, rtol=1e-5, atol=1e-6)
    for r in results[1:]:
        for n, p in results[0]["node"].items():
            assert torch.equal(p, r["node"][n])


def test_stage_b_is_issued_from_a_hook_call_once_stage_a_has_arrived() -> None:
    # Hook calls 0.2 s apart: each bucket's stage A has arrived by the next call, which must issue its
    # stage B there (decoded in its callback while the backward goes on), not from the last call.
    results = run_distributed(early_inside, 4, [[0, 1], [2, 3]], 4, 0.2, timeout=240)
    for rank, r in enumerate(results):
        early = 0
        for s, ((before, after), inside) in enumerate(zip(r["across"], r["inside_after"], strict=True)):
            assert len(inside) == after - before, (rank, s, r["across"], r["inside_after"])  # one B per A
            assert inside == sorted(inside) and all(before < a <= after for a in inside), (rank, s, inside)
            # issued before the step's last sparse bucket's hook call began (its pump sees after - 1)
            early += sum(a < after - 1 for a in inside)
        assert sum(after - before >= 3 for before, after in r["across"][1:]) == 3, r["across"]
        assert early >= 3, (rank, r["inside_after"])  # at least one per sparse step
    for r in results[1:]:
        for n, p in results[0]["params"].items():
            assert torch.isfinite(p).all()
            assert torch.equal(p, r["params"][n])
