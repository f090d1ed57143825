"""``DGCConfig(hierarchy="node")`` under Horovod: 4 ``horovodrun --gloo`` processes in 2 simulated nodes
(``node_groups=[[0, 1], [2, 3]]``), against flat Horovod DGC; plus the transport-neutral pieces in-process.

The scenarios live in ``tests/horovod_workers/hierarchy.py``; rank 0 writes what it measured to a JSON
file that these tests check.  Horovod's launcher cannot fake two hosts on one machine (its gloo
rendezvous keys the node contexts by host), hence explicit ``node_groups``; the nodes found from
``hvd.cross_rank()``/``hvd.local_rank()`` are checked on the one real host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_horovod import ROOT, _free_port, _horovodrun, _need_horovod

from dgc.hierarchy import NodePlace, check_node_groups, node_groups_from_places

WORKER = Path(__file__).resolve().parent / "horovod_workers" / "hierarchy.py"
TIMEOUT = 180  # seconds per 4-process launch (each takes ~20-40 s on 2 loaded cores)


def launch(scenario: str, tmp_path: Path) -> dict:
    """Rank 0's figures of ``scenario`` run by 4 processes."""
    _need_horovod()
    out = tmp_path / f"{scenario}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DGC_TEST_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("HOROVOD_DYNAMIC_PROCESS_SETS", None)  # each scenario chooses its process sets itself
    cmd = [*_horovodrun(), "--gloo", "-np", "4", "-H", "localhost:4", sys.executable, str(WORKER), scenario, str(out)]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"horovodrun -np 4 {scenario!r}: no result after {TIMEOUT}s\n{str(exc.stdout)[-3000:]}")
    if proc.returncode or not out.exists():
        pytest.fail(f"horovodrun -np 4 {scenario!r} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    assert result["world_size"] == 4, result
    return result


# ----------------------------------------------------------------------- in-process
def test_nodes_from_horovod_places_group_by_cross_rank_in_local_order() -> None:
    # ranks 0..5 on hosts B, A, B, A, B, A (cross ranks 1, 0, ...), local ranks as horovodrun numbers them
    places = [NodePlace(node=r % 2 ^ 1, local_rank=r // 2) for r in range(6)]
    assert node_groups_from_places(places) == [[1, 3, 5], [0, 2, 4]]


def test_bad_node_layouts_are_refused_naming_the_fix() -> None:
    with pytest.raises(ValueError, match="same number of processes.*hierarchy='flat'"):
        check_node_groups([[0, 1, 2], [3]], 4)
    with pytest.raises(ValueError, match="exactly once"):
        check_node_groups([[0, 1], [1, 2, 3]], 4)
    with pytest.raises(ValueError, match="exactly once"):
        check_node_groups([[0, 1]], 4)
    assert check_node_groups([[3, 2], [1, 0]], 4) == [[2, 3], [0, 1]]


def test_buckets_follow_ddp_order_per_dtype_with_a_cap() -> None:
    _need_horovod()
    from dgc.hierarchy_horovod_steps import plan_buckets

    named = [(f"p{i}", torch.zeros(256, dtype=torch.float64 if i == 2 else torch.float32)) for i in range(5)]
    buckets = [[n for n, _ in b] for b in plan_buckets(named, cap_bytes=2048)]
    # reverse order, each dtype's bucket closed at 2 KiB (p2 alone fills its float64 bucket)
    assert buckets == [["p4", "p3"], ["p2"], ["p1", "p0"]]


# ------------------------------------------------------------------- horovodrun --gloo -np 4
@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_node_equals_flat_horovod_dgc_and_receives_fewer_bytes(tmp_path: Path) -> None:
    r = launch("equal", tmp_path)
    for key in ("density1", "density1_momentum", "dense_policy"):
        m = r[key]
        assert m["moved"] > 1e-2, (key, m)  # training changed the parameters
        assert max(m["max_diff_per_step"]) <= 1e-5, (key, m)
        assert m["spread"] == 0.0, (key, m)  # every rank holds the same parameters
    assert r["density1"]["node_sparse_steps"] >= 3, r  # the all-gather path ran, not only dense steps
    assert any(p.startswith("fc2.weight[") for p in r["density1"]["pieces"]), r  # a tensor was split
    assert r["dense_policy"]["node_sparse_steps"] == 0, r
    received = r["received"]
    assert received["node_sparse_steps"] >= 3, r
    # the sparse steps: padded share messages (about half of each message) beside the buckets of
    # small tensors, which are reduced whole either way (23,808 vs 29,632 bytes when written)
    assert received["node"] < 0.85 * received["flat"], r


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_invariant_per_share_checkpoint_layout_and_bad_nodes(tmp_path: Path) -> None:
    r = launch("invariant", tmp_path)
    assert r["sparse_steps"] >= 4, r
    assert r["residual_norm"] > 1e-3, r  # a real residual was carried
    assert r["max_rel_err"] <= 1e-5, r  # sent + owners' residuals == node-averaged corrected gradients
    assert r["owners_ok"], r  # one local rank per node holds each element's momentum and residual
    assert r["pieces"], r  # ... of tensors split between the local ranks
    assert "'node' layout" in r["checkpoint_error"] and "hierarchy='node'" in r["checkpoint_error"], r
    assert "same number of processes" in r["unequal_nodes"], r
    assert "exactly once" in r["rank_twice"], r
    assert r["found_nodes"] == [[0, 1, 2, 3]], r


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_process_sets_passed_at_init_are_used_and_missing_ones_named(tmp_path: Path) -> None:
    r = launch("static_sets", tmp_path)
    assert r["node_sparse_steps"] >= 2, r
    assert r["max_diff"] <= 1e-5, r
    assert "process_sets='dynamic'" in r["missing_sets"] and "hvd.ProcessSet" in r["missing_sets"], r
    # policy="auto" with hierarchy="node": decisions taken, the same on every rank, share-aware
    assert r["auto_decided"] > 0 and r["auto_same_everywhere"] and r["auto_topology"], r
    assert r["auto_spread"] == 0.0, r
