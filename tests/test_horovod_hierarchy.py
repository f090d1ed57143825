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
EXCHANGE = WORKER.with_name("node_exchange.py")
TIMEOUT = 180  # seconds per 4-process launch (each takes ~20-40 s on 2 loaded cores)


def launch(scenario: str, tmp_path: Path, worker: Path = WORKER) -> dict:
    """Rank 0's figures of ``scenario`` (of ``worker``) run by 4 processes."""
    _need_horovod()
    out = tmp_path / f"{scenario}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DGC_TEST_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("HOROVOD_DYNAMIC_PROCESS_SETS", None)  # each scenario chooses its process sets itself
    cmd = [*_horovodrun(), "--gloo", "-np", "4", "-H", "localhost:4", sys.executable, str(worker), scenario, str(out)]
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


def test_cross_sets_are_all_or_none_added_in_local_rank_order(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    _need_horovod()
    from types import SimpleNamespace

    from dgc import hierarchy_horovod as hh

    registered = {(0, 2)}  # local rank 0's set registered (e.g. at init), local rank 1's not
    added: list[list[int]] = []
    monkeypatch.setattr(hh, "registered_process_set",
                        lambda r: ("registered", tuple(sorted(r))) if tuple(sorted(r)) in registered else None)
    monkeypatch.setattr(hh.hvd, "add_process_set", lambda r: added.append(list(r)) or ("added", tuple(r)))
    monkeypatch.setenv("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    got = hh.cross_process_sets([[0, 2], [3, 1]])
    assert got.sets == [("registered", (0, 2)), ("added", (1, 3))] and added == [[1, 3]], got
    # fixed process sets: none (not local rank 0's alone: every rank must take the same path)
    monkeypatch.delenv("HOROVOD_DYNAMIC_PROCESS_SETS")
    got = hh.cross_process_sets([[0, 2], [1, 3]])
    assert got.sets is None and "[[1, 3]]" in got.why and "process_sets='dynamic'" in got.why, got
    assert added == [[1, 3]]
    # the reason is logged by rank 0 only, once
    monkeypatch.setattr(hh, "_SAID", set())
    with caplog.at_level("WARNING", logger="dgc.hierarchy_horovod"):
        for rank in (1, 0, 0):
            hh._say_once(SimpleNamespace(rank=rank), got.why)
    assert [r.getMessage().count("[[1, 3]]") for r in caplog.records] == [1], caplog.text


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
    # the sparse steps: each rank hands (n - 1) = 1 padded share message (about half a message) across
    # the nodes per bucket, where flat sends its whole message to N - 1 = 3 others (5,632 against 33,888
    # bytes when written); what it receives, stage A's n and stage B's N share messages, is about flat's
    # on this small net (33,792 against 29,632 bytes: each share message carries its own header and
    # alignment), less at ResNet-50's sizes (docs/policy.md)
    assert 0 < received["node_across"] < 0.4 * received["flat_across"], r


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


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_two_stages_send_n_minus_1_messages_across_and_decode_the_one_stage_bits(tmp_path: Path) -> None:
    r = launch("two_stage", tmp_path, EXCHANGE)
    assert r["two_stage"], r  # dynamic process sets: dgc added the cross sets
    sparse = [i for i, b in enumerate(r["buckets"]) if b]
    assert len(sparse) >= 2, r
    for i in sparse:
        # (n - 1) W per sparse bucket, counted by the topology and seen by the spy: n = 2 nodes, not the
        # (N - 1) W = 3 W of an all-gather over all 4 processes (what the forced one-stage run hands)
        assert r["counter"][i] == r["across"][i] == r["expected"][i] > 0, r
        assert r["one_stage_across"][i] == 3 * r["one_stage_expected"][i] > 0, r
        # stage A over the 2 ranks of a local rank, stage B over the 2 of the node: nothing over all 4
        assert r["set_sizes"][i] == [2], r
        assert r["one_stage_set_sizes"][i] == [4], r
    # every row is the message the one-stage all-gather puts at that rank, and the decode is bitwise
    # the one-stage decode; so are the parameters after training
    assert r["rows_equal"] and r["decoded_equal"], r
    assert r["max_diff_one_stage"] == 0.0, r


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_without_cross_sets_one_gather_over_all_processes_and_rank_0_says_why(tmp_path: Path) -> None:
    r = launch("one_stage", tmp_path, EXCHANGE)  # only the node sets, at hvd.init(process_sets=[...])
    assert not r["two_stage"], r
    sparse = [i for i, b in enumerate(r["buckets"]) if b]
    assert sparse, r
    for i in sparse:
        assert r["counter"][i] == r["across"][i] == 3 * r["expected"][i] > 0, r  # (N - 1) W
        assert r["set_sizes"][i] == [4], r
    assert len(r["said"]) == 1, r  # once, though two optimizers were built
    assert "process_sets='dynamic'" in r["said"][0] and "hvd.ProcessSet(peers)" in r["said"][0], r
