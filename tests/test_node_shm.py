"""The shared-memory intra-node stage of hierarchy="node" (dgc/node_shm.py): 2 and 4 gloo processes on
this host, one node."""

from __future__ import annotations

import os

import pytest
import torch
from _dist import run_distributed
from node_shm_workers import (
    Ranges,
    hierarchy_counted,
    peer_gone,
    pipelined_hook,
    posted_late,
    random_shares,
    reduce_random,
)

from dgc.node_shm import folds, reduce_reference

pytestmark = pytest.mark.timeout(180)

# a few hundred elements, then growth past the first 64 KiB segment, a small call, growth again
NUMELS = [300, 40_000, 7, 250_000, 1_000]


@pytest.mark.parametrize(
    ("world", "dtype", "fold"),
    [(2, "float32", True), (4, "float32", True), (4, "float32", False), (3, "float32", True),
     (2, "bfloat16", True), (4, "bfloat16", True)],
)
def test_owner_gets_the_node_average_of_its_share_and_the_rest_is_untouched(world: int, dtype: str,
                                                                            fold: bool) -> None:
    results = run_distributed(reduce_random, world, dtype, NUMELS, fold, timeout=120)
    for r in results:
        assert r["equal"] == [True] * len(NUMELS)
        # the folded division (powers of two) has the bits of sum-then-divide; L = 3 and bf16 never fold
        assert r["unfolded"] == [True] * len(NUMELS)
        assert r["half_bytes"][0] < r["half_bytes"][-1]  # grew (a new segment)
        assert len(r["paths"]) >= 2 and r["paths"] == results[0]["paths"]
        assert r["left"] == []  # unlinked as soon as every process had mapped it
    assert not any(os.path.exists(p) for p in results[0]["paths"])


def test_reference_averages_the_owners_share_only() -> None:
    shares = [Ranges((0, 6), (2, 1)), Ranges((3,), (2,))]  # positions 2 and 7 owned by nobody
    buffers = [torch.arange(8.0), 10 * torch.arange(8.0)]
    for fold in (True, False):
        out = reduce_reference(shares, buffers, owner=1, fold=fold)
        assert out.tolist() == [0, 10, 20, 16.5, 22, 50, 60, 70]
    out = reduce_reference(shares, [b.bfloat16() for b in buffers], owner=0)
    assert out.dtype == torch.bfloat16 and out.tolist() == [0, 5.5, 2, 3, 4, 5, 33, 7]


@pytest.mark.parametrize("size", [2, 4, 8])
def test_folded_division_has_the_bits_of_sum_then_divide(size: int) -> None:
    # magnitudes from 1e-30 to 1e30 (no subnormal after the scaling, no overflow of the sum)
    gen = torch.Generator().manual_seed(size)
    buffers = [torch.randn(20_000, generator=gen) * 10.0 ** torch.randint(-30, 31, (20_000,), generator=gen)
               for _ in range(size)]
    shares = [Ranges((0,), (20_000,))] + [Ranges((), ())] * (size - 1)
    assert folds(torch.float32, size)
    folded = reduce_reference(shares, buffers, 0, fold=True)
    assert torch.equal(folded, reduce_reference(shares, buffers, 0, fold=False))
    assert torch.equal(folded, sum(buffers[1:], buffers[0].clone()) / size)  # the reference's own sum order


def test_only_exact_divisions_fold() -> None:
    assert [n for n in range(1, 17) if folds(torch.float32, n)] == [2, 4, 8, 16]
    assert folds(torch.float64, 4) and not folds(torch.bfloat16, 2) and not folds(torch.float16, 4)
    # why 3 does not fold: x / 3 + y / 3 is not (x + y) / 3 for every pair
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(10_000, generator=gen), torch.randn(10_000, generator=gen)
    assert not torch.equal(x * (1 / 3) + y * (1 / 3), (x + y) / 3)


def test_random_shares_are_disjoint_ranges() -> None:
    gen = torch.Generator().manual_seed(0)
    shares = random_shares(1000, 4, gen)
    seen = torch.zeros(1000, dtype=torch.int32)
    for s in shares:
        for o, n in zip(s.offsets, s.numels, strict=True):
            seen[o : o + n] += 1
    assert int(seen.max()) == 1 and sum(len(s.offsets) for s in shares) > 4


@pytest.mark.parametrize("node_reduce", ["auto", "shm", "collective"])
def test_node_hierarchy_equals_flat_on_both_paths(node_reduce: str) -> None:
    cfg = dict(density=1.0, momentum=0.0, min_compress_numel=16, dense_steps=1, node_reduce=node_reduce)
    results = run_distributed(hierarchy_counted, 4, cfg, timeout=150)
    for r in results:
        assert (r["shm_calls"] > 0) == (node_reduce != "collective")  # auto: one host, shared memory
        for n, p in r["flat"].items():
            torch.testing.assert_close(r["node"][n], p, rtol=1e-5, atol=1e-6)
        assert r["node_sparse"] == r["flat_sparse"] > 0
    for r in results[1:]:
        for n, p in results[0]["node"].items():
            assert torch.equal(p, r["node"][n])


def test_shm_forced_across_hosts_is_refused_and_auto_falls_back() -> None:
    cfg = dict(density=1.0, momentum=0.0, min_compress_numel=16, dense_steps=1)
    for r in run_distributed(hierarchy_counted, 4, dict(cfg, node_reduce="shm"), True, timeout=120):
        assert "node_reduce='shm'" in r["error"] and "different hosts" in r["error"], r
        assert "node_reduce='auto'" in r["error"]  # the fix
    for r in run_distributed(hierarchy_counted, 4, dict(cfg, node_reduce="auto"), True, timeout=120):
        assert r["shm_calls"] == 0
        for n, p in r["flat"].items():
            torch.testing.assert_close(r["node"][n], p, rtol=1e-5, atol=1e-6)


def test_a_call_posted_before_the_other_process_is_completed_later_in_order() -> None:
    results = run_distributed(posted_late, 2, timeout=60)
    for r in results:
        assert r["equal"] == [True, True, True]
        assert "call 0 is not completed" in r["two_behind"]  # at most one call open
        assert "complete in order" in r["out_of_order"]
    early = results[0]
    assert early["ready_at_once"] is False  # rank 1 sleeps 0.5 s before posting
    assert early["posting_s"] < 0.3  # posting two calls did not wait for it
    assert early["waits"] >= 1  # completing did
    assert results[1]["ready_at_once"] is True


def test_a_dead_process_of_the_node_is_named_instead_of_a_hang() -> None:
    r = run_distributed(peer_gone, 2, timeout=60)[0]
    assert "local rank 1" in r["error"] and "exited" in r["error"], r
    assert "node_reduce='collective'" in r["error"]  # the way out
    assert r["seconds"] < 10


def test_the_hook_completes_a_bucket_at_a_later_call_and_every_rank_agrees() -> None:
    # (node equals flat through this path: test_node_hierarchy_equals_flat_on_both_paths)
    results = run_distributed(pipelined_hook, 4, timeout=150)
    for r in results:
        assert r["sparse"] > 0 and all(later > call for call, later in r["completed"])
        for n, p in results[0]["params"].items():
            assert torch.equal(p, r["params"][n])
    # local rank 0 of node 0 posted while its peer slept: some bucket completed a hook call later
    assert any(later > call + 1 for call, later in results[0]["completed"]), results[0]["completed"]


def test_counters_publish_and_read_back() -> None:
    from dgc.kernels import cpu_fused

    assert cpu_fused.counters_ordered()  # the compiled kernels, or x86: shared memory is usable here
    counters = torch.zeros(32, dtype=torch.int64)
    cpu_fused.counter_store(counters, 8, 41)
    cpu_fused.counter_store(counters, 8, 42)
    assert cpu_fused.counter_load(counters, 8) == 42 and int(counters[8]) == 42
    assert int(counters.sum()) == 42  # nothing else written
