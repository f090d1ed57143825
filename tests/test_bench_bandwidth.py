"""The bandwidth benchmark (dgc.bench.bandwidth, launch/bench_bandwidth.py): model shapes, byte
accounting, a tiny run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

from dgc.bench import bandwidth, grad_shapes

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ model shapes
def _counts(model: torch.nn.Module) -> tuple[int, int, int, int]:
    params = list(model.parameters())
    matrices = [p for p in params if p.dim() > 1]
    return (
        sum(p.numel() for p in params),
        len(params),
        len(matrices),
        sum(p.numel() for p in params if p.dim() <= 1),
    )


def test_resnet50_shapes_match_torchvision() -> None:
    with torch.device("meta"):  # shapes only, no 100 MB allocation
        model = grad_shapes.ResNet50()
    total, tensors, matrices, vectors = _counts(model)
    # torchvision.models.resnet50(): 25,557,032 parameters in 161 tensors; 53 convolutions and
    # the fc weight are matrices, the 53 BatchNorms (weight + bias) and the fc bias go dense.
    assert total == 25_557_032
    assert tensors == 161
    assert matrices == 54
    assert vectors == 2 * 26_560 + 1000  # BatchNorm channels of ResNet-50: 26,560
    names = dict(model.named_parameters())
    assert tuple(names["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(names["layer3.0.downsample.0.weight"].shape) == (1024, 512, 1, 1)
    assert tuple(names["layer4.2.conv2.weight"].shape) == (512, 512, 3, 3)
    assert tuple(names["fc.weight"].shape) == (1000, 2048)


def test_vgg16_and_lstm_shapes() -> None:
    with torch.device("meta"):
        vgg, lstm = grad_shapes.VGG16(), grad_shapes.LSTMLanguageModel()
    assert _counts(vgg)[:2] == (138_357_544, 32)  # torchvision.models.vgg16()
    # 2 x 1500 LSTM, vocabulary 10,000, tied decoder: 15M + 2 x 18.012M + 10k = 194.7 MiB.
    assert _counts(lstm)[:2] == (51_034_000, 10)
    assert lstm.decoder.weight is lstm.encoder.weight


def test_build_checks_and_real_forward() -> None:
    with pytest.raises(ValueError, match="unknown"):
        grad_shapes.build("resnet51")
    model = grad_shapes.build("tiny")
    x, y = grad_shapes.make_batch("tiny", 2)
    grad_shapes.real_loss(model, x, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_synthetic_gradients_are_the_directions() -> None:
    model = grad_shapes.build("tiny")
    dirs = [torch.randn_like(p) for p in model.parameters()]
    grad_shapes.SyntheticGradients(model, dirs)(2.5).backward()
    for p, d in zip(model.parameters(), dirs, strict=True):
        torch.testing.assert_close(p.grad, 2.5 * d)
    with pytest.raises(ValueError, match="directions"):
        grad_shapes.SyntheticGradients(model, dirs[:-1])


# ------------------------------------------------------------------------------- byte accounting
def _analytic_message_bytes(names: list[str], density: float, value_bytes: int) -> int:
    """wire.py's format, computed independently: 4 + I + w(K + D), padded to 8 bytes, where the K
    positions take I = 4K bytes (int32) or 4B + 2K rounded up to 4 (block16, B blocks of 65536
    elements), whichever is smaller (index_format="auto"; a tie keeps int32)."""
    params = dict(grad_shapes.build("tiny").named_parameters())
    k = d = 0
    for name in names:
        p = params[name]
        if p.dim() > 1 and p.numel() >= 1024:
            k += math.ceil(density * p.numel())
        else:
            d += p.numel()
    blocks = math.ceil(sum(params[n].numel() for n in names) / 65536)
    block16 = 4 * blocks + math.ceil(2 * k / 4) * 4
    index = block16 if k and block16 < 4 * k else 4 * k
    raw = 4 + index + value_bytes * (k + d)
    return (raw + 7) // 8 * 8


def _bench_worker(rank: int, world_size: int, methods: list[str], init: str) -> dict[str, dict]:
    torch.set_num_threads(1)
    # The benchmark sees the collectives through its counting process group: the default one.
    dist.destroy_process_group()
    bandwidth.init_counting_process_group("gloo", init_method=f"file://{init}", rank=rank,
                                          world_size=world_size)
    opts = bandwidth.RunOptions(
        model="tiny", compute="real", batch=2, warmup=3, steps=2, replay=0,
        bucket_cap_mb=0.008, iface="lo",
    )
    return {m: asdict(bandwidth.run_method(bandwidth.METHODS[m], opts)) for m in methods}


@pytest.mark.timeout(120)
def test_byte_counts_match_the_wire_format(tmp_path: Path) -> None:
    methods = ["dense", "dgc", "dgc-fp16"]
    results = run_distributed(_bench_worker, 2, methods, str(tmp_path / "init"), timeout=110)
    n = 2
    params = 7224
    for rank, res in enumerate(results):
        for name in ("dgc", "dgc-fp16"):
            r = res[name]
            w = 2 if name == "dgc-fp16" else 4
            assert len(r["buckets"]) >= 2, "the tiny bucket cap should give several buckets"
            assert sorted(x for b in r["buckets"] for x in b) == sorted(
                dict(grad_shapes.build("tiny").named_parameters()))
            per_bucket = [_analytic_message_bytes(b, 0.001, w) for b in r["buckets"]]
            stats = r["dgc_stats"]
            assert stats["bytes_sent"] == sum(per_bucket), (rank, name)
            assert stats["bytes_received"] == n * sum(per_bucket)
            assert stats["dense_bytes"] == 4 * params
            # What the benchmark saw handed to the collectives: one allgather per bucket, of
            # exactly these messages (the hook calls them in bucket order).
            assert r["payload_bytes"] == sum(per_bucket)
            assert r["stats_bytes_sent"] == sum(per_bucket)  # the method's own account
            assert [op["op"] for op in r["ops"]] == ["all_gather_single"] * len(per_bucket)
            assert [op["bytes"] for op in r["ops"]] == per_bucket
            assert all(op["out_numel"] == n * op["in_numel"] for op in r["ops"])
            # lo is shared by both ranks (and anything else on the machine): it carried at
            # least every rank's message to the other rank, each step (raw counts: the
            # barriers' traffic, measured apart, is added back).
            raw_tx = r["tx_bytes"] + r["barrier_tx_bytes"]
            assert raw_tx >= n * (n - 1) * sum(per_bucket)
        assert res["dense"]["payload_bytes"] == 4 * params
        assert res["dense"]["stats_bytes_sent"] == 4 * params
        # DDP's own allreduce (no hook) went through the counting group too.
        assert {op["op"] for op in res["dense"]["ops"]} == {"all_reduce"}
        dense = res["dense"]
        assert dense["tx_bytes"] + dense["barrier_tx_bytes"] >= n * 2 * (n - 1) / n * 4 * params
        for r in res.values():
            assert r["step_s"] > 0 and r["collectives"] >= 1


# ----------------------------------------------------------------------------- report arithmetic
def test_break_even_crossing() -> None:
    # dense: 0.5 s + 800 Mbit / rate; method: 0.7 s + 8 Mbit / rate -> equal at 3.96 Gbit/s.
    assert bandwidth.cross(0.5, 8e8, 0.7, 8e6) == pytest.approx(7.92e8 / 0.2)
    assert bandwidth.cross(0.5, 8e8, 0.4, 8e6) == math.inf  # cheaper everywhere
    assert bandwidth.cross(0.5, 8e6, 0.7, 8e8) is None  # never
    rows = [
        {"model": "m", "nodes": 2, "method": meth, "rate_bit_s": rate,
         "step_s": a + b / rate, "local_cpu_s": a, "tx_bytes": b / 8}
        for meth, a, b in (("dense", 0.5, 8e8), ("dgc", 0.7, 8e6))
        for rate in (1e9, 1e10)
    ]
    be = bandwidth.break_even(rows, "dgc", "m", 2)
    assert be["fit_bit_s"] == pytest.approx(3.96e9)
    assert be["cost_model_bit_s"] == pytest.approx(3.96e9)


# ---------------------------------------------------------------------------------- end to end
E2E_METHODS = ["dense", "fp16", "powersgd-r1", "dgc"]


@pytest.mark.timeout(150)
def test_worker_end_to_end_and_report(tmp_path: Path) -> None:
    run_json = tmp_path / bandwidth.RUNS_DIR / "tiny-n2-loopback.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "launch" / "bench_bandwidth.py"), "worker", "--model", "tiny",
        "--methods", ",".join(E2E_METHODS), "--steps", "2", "--local-steps", "1", "--replay", "1",
        "--replay-budget-s", "0",
        "--threads", "1",
        "--out", str(run_json),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=140, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(run_json.read_text())
    assert data["meta"]["nodes"] == 2 and data["meta"]["iface"] == "lo"
    assert [m["method"] for m in data["methods"]] == E2E_METHODS
    by = {m["method"]: m for m in data["methods"]}
    for m in by.values():
        assert m["step_s"] > 0 and m["local_step_s"] > 0
        assert m["tx_bytes"] + m["barrier_tx_bytes"] >= 2 * m["payload_bytes"]  # lo: both ranks
        assert m["step_cpu_s"] > 0 and m["local_cpu_s"] > 0 and m["comm_replay_s"] > 0
        assert len(m["step_s_ranks"]) == 2
    assert by["dense"]["codec_s"] == 0.0 and by["dense"]["codec_cpu_s"] == 0.0
    # Payload sizes order as the methods promise (tiny model: PowerSGD's factors are small).
    pay = {k: v["payload_bytes"] for k, v in by.items()}
    assert pay["dense"] == 2 * pay["fp16"] == 4 * 7224
    assert pay["dgc"] < pay["powersgd-r1"] < pay["fp16"]

    data["meta"]["link"] = {"simulated": False, "asked_bit_s": None}
    data["meta"]["rate"] = "loopback"
    run_json.write_text(json.dumps(data))
    bandwidth.report(tmp_path)
    rows = list(csvrows(tmp_path / "bandwidth.csv"))
    assert [r["method"] for r in rows] == E2E_METHODS
    dgc_row = next(r for r in rows if r["method"] == "dgc")
    assert float(dgc_row["ratio_payload"]) == pytest.approx(4 * 7224 / pay["dgc"])
    for png in ("bytes_per_method.png", "speedup.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "| dgc |" in (tmp_path / "summary.md").read_text()


def csvrows(path: Path):
    import csv

    with open(path, newline="") as f:
        yield from csv.DictReader(f)


# ------------------------------------------------------------ policy and hierarchy (issue 13)
POLICY_METHODS = ["dgc-dense", "dgc-auto", "dgc-node", "dgc@0.25", "dgc-auto@0.25"]


def test_method_registry_has_policy_and_hierarchy_methods() -> None:
    from dgc.bench.bandwidth.methods import AUTO_INTERVAL, DENSE_STEPS, MethodContext, least_warmup

    for name in POLICY_METHODS:
        assert name in bandwidth.METHODS
    ctx = MethodContext(backend="gloo")
    cfg = {name: bandwidth.METHODS[name].build(ctx).config for name in ["dgc", *POLICY_METHODS]}
    assert cfg["dgc"].policy == "sparse" and cfg["dgc"].hierarchy == "flat"
    assert cfg["dgc-dense"].policy == "dense"
    assert cfg["dgc-node"].hierarchy == "node" and cfg["dgc-node"].policy == "sparse"
    for name in ("dgc-auto", "dgc-auto@0.25"):
        assert cfg[name].policy == "auto" and cfg[name].policy_interval == AUTO_INTERVAL
        # dense steps measured first, then two decisions before the first measured step
        assert bandwidth.METHODS[name].warmup >= DENSE_STEPS + 2 * AUTO_INTERVAL
    assert cfg["dgc@0.25"].density == cfg["dgc-auto@0.25"].density == 0.25
    assert cfg["dgc-auto"].density == cfg["dgc"].density == 0.001
    assert least_warmup(["dense", "dgc"]) == 3
    assert least_warmup(["dense", "dgc-auto"]) == bandwidth.METHODS["dgc-auto"].warmup
    with pytest.raises(ValueError, match="--compute"):
        bandwidth.RunOptions(compute="gpu").check()


def test_node_groups_from_the_cluster_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    from dgc.bench.bandwidth.layout import NodeLayout, cluster_node_groups, groups_from_hosts
    from dgc.hierarchy import node_groups_from_env

    assert cluster_node_groups(2, 2) == [[0, 1], [2, 3]]
    assert cluster_node_groups(3, 1) == [[0], [1], [2]]
    hosts = ["node0", "node0", "node1", "node1"]
    assert groups_from_hosts(hosts) == [[0, 1], [2, 3]]
    layout = NodeLayout.check(hosts, local_world_size=2)
    assert (layout.nodes, layout.procs_per_node) == (2, 2)
    # what torchrun's LOCAL_WORLD_SIZE makes the library see is the cluster's layout
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert node_groups_from_env(4) == layout.groups == cluster_node_groups(2, 2)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=2"):  # ranks not node by node
        NodeLayout.check(["node0", "node1", "node0", "node1"], local_world_size=2)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=1"):
        NodeLayout.check(hosts, local_world_size=1)
    assert NodeLayout.check(["h"] * 4, local_world_size=None).groups == [[0, 1, 2, 3]]


def test_policy_sweep_plan_runs_several_processes_per_node() -> None:
    from dgc.bench.bandwidth.policy_sweep import PolicySweepOptions, plan

    runs = plan(PolicySweepOptions(nodes=(2, 4), procs_per_node=2))
    assert [r.name for r in runs] == ["resnet50-n2x2-unlimited", "resnet50-n2x2-unlimited-density-0.25",
                                      "resnet50-n2x2-1gbit", "resnet50-n2x2-10gbit", "resnet50-n4x2-1gbit"]
    assert [r.processes for r in runs] == [4, 4, 4, 4, 8]
    assert {"dense", "dgc", "dgc-auto", "dgc-node"} <= set(runs[3].methods)
    assert len(plan(PolicySweepOptions(nodes=(2, 4), mid=()))) == 4
    assert {"dense", "dgc-dense", "dgc", "dgc-auto"} <= set(runs[0].methods)
    assert {"dense", "dgc@0.25", "dgc-auto@0.25"} <= set(runs[1].methods)
    assert {"dense", "dgc", "dgc-auto", "dgc-node"} <= set(runs[2].methods)
    assert {"dgc", "dgc-node"} <= set(runs[4].methods)
    assert runs[0].local_steps > 0 and runs[1].local_steps > 0 and runs[2].local_steps == 0
    with pytest.raises(ValueError, match="procs-per-node"):
        plan(PolicySweepOptions(procs_per_node=1))


def test_cost_model_step_prediction_is_the_library_formula() -> None:
    from dgc.bench.bandwidth.cost_model import Network, Traffic, predict_step
    from dgc.policy import predict

    net = Network(processes=4, procs_per_node=2, link_bit_s=1e9, latency_s=1e-4, intra_bit_s=1e10,
                  codec_s=0.05, local_s=0.1)
    tr = Traffic(dense=100_000_000, message=400_000, share=210_000)
    p = predict_step(net, tr)
    lib = predict(4, tr.dense, tr.message, 0.05, 1e9 / 8, 1e-4)
    assert p["dense"] == pytest.approx(0.1 + 1.5 * 0.8 + 6e-4)  # ring: 2 (N-1)/N of 800 Mbit
    assert p["dense"] == pytest.approx(0.1 + lib.dense)
    assert p["sparse"] == pytest.approx(0.1 + lib.sparse) == pytest.approx(0.1 + 3 * 0.0032 + 3e-4 + 0.05)
    assert p["auto"] == min(p["dense"], p["sparse"]) and p["auto_choice"] == "sparse"
    # node: intra-node allreduce of the whole gradient, the share message across to the other node
    # only ((n-1) W, one hop), the gather inside the node of the n W each rank got, half the codec
    across = 1 * 210_000 * 8 / 1e9 + 1e-4
    inside = 1 * 2 * 210_000 * 8 / 1e10
    assert p["node"] == pytest.approx(0.1 + 0.08 + across + inside + 0.025)


def _message_bytes(numels: list[int], ks: list[int]) -> int:
    """The wire format of docs/wire.md, independently: 4 + index + 4 (K + D), padded to 8; the
    index is the smaller of int32 (4K) and block16 (4B + 2K rounded up to 4), or the bitmap."""
    span, k = sum(numels), sum(ks)
    dense = sum(n for n, kk in zip(numels, ks, strict=True) if kk == 0)
    blocks = -(-span // 65536)
    index = min(4 * k, 4 * blocks + (2 * k + 3) // 4 * 4, (-(-span // 8) + 3) // 4 * 4)
    return (4 + index + 4 * (k + dense) + 7) // 8 * 8


def test_scaling_table_traffic_and_predictions(capsys: pytest.CaptureFixture[str]) -> None:
    from dgc.bench.bandwidth import scaling

    tr = scaling.traffic_of("resnet50", 0.001, 8)
    assert tr.dense == 4 * 25_557_032
    with torch.device("meta"):
        params = [(n, p.numel(), p.dim()) for n, p in grad_shapes.build("resnet50").named_parameters()]
    sizes = {n: (numel, dim) for n, numel, dim in params}
    expected = 0
    for names in scaling._buckets([(n, numel) for n, numel, _ in params], 25 * 1024 * 1024):
        numels = [sizes[n][0] for n in names]
        ks = [math.ceil(0.001 * sizes[n][0]) if sizes[n][1] > 1 and sizes[n][0] >= 1024 else 0
              for n in names]
        expected += _message_bytes(numels, ks)
    assert tr.message == expected
    assert 360_000 < tr.message < 380_000  # the measured payload of the bandwidth sweep: 371,272
    # padded shares: an eighth of the message each, plus the constants of a message (its header and
    # the bucket's block16 counts); whole-tensor shares gave 0.175 M
    assert tr.message / 8 < tr.share < 0.13 * tr.message

    rows = scaling.table(tr, codec_s=0.005, compute_s=0.1, latency_s=1e-5, intra_gbit=1200)
    assert len(rows) == 12 and {r.gpus for r in rows} == set(scaling.GPUS)
    for rate in scaling.RATES_GBIT:
        rr = [r for r in rows if r.link_gbit == rate and r.nodes > 1]
        assert [r.sparse_s for r in rr] == sorted(r.sparse_s for r in rr)  # grows with workers
        for r in rr:
            assert r.auto_s == min(r.dense_s, r.sparse_s) > 0.1
            assert r.auto_choice == ("sparse" if r.sparse_s < r.dense_s else "dense")
            assert (r.switch_gbit > rate) == (r.auto_choice == "sparse")
    # at 25 Gbit/s a 100 MB allreduce costs > 50 ms; 0.37 MB x 15 peers far less
    r16 = next(r for r in rows if r.gpus == 16 and r.link_gbit == 25)
    assert r16.dense_s - 0.1 > 0.05 and r16.auto_choice == "sparse"
    assert scaling.main(["--table", "--codec-ms", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("| 25 Gbit/s |") == 6 and out.count("| 100 Gbit/s |") == 6
    assert "371,296" in out or f"{tr.message:,}" in out


def test_policy_goals_from_rows() -> None:
    from dgc.bench.bandwidth.policy_report import goals

    def row(rate: str, method: str, step: float, tx: float = 1.0) -> dict:
        return {"nodes": 2, "rate": rate, "method": method, "step_s": step, "tx_bytes": tx}

    quarter = [{**row("unlimited", m, t), "tag": "density-0.25"}
               for m, t in (("dense", 1.1), ("dgc-auto@0.25", 1.2))]
    rows = [row("unlimited", "dense", 1.0), row("unlimited", "dgc-auto", 1.02), *quarter,
            row("unlimited", "dgc-auto@0.25", 1.0), row("1gbit", "dense", 2.0),
            row("1gbit", "dgc", 1.0, 4.0), row("1gbit", "dgc-auto", 1.04),
            row("1gbit", "dgc-node", 0.9, 2.5)]
    # a tagged run of the same cluster (the dense-path run) does not count for the goals
    rows = [{**row("unlimited", "dgc-auto", 9.0), "tag": "dense-path"}, *rows]
    met = {g["goal"]: g["met"] for g in goals(rows)}
    assert list(met.values()) == [True, False, True, False, False, True]


@pytest.mark.timeout(150)
def test_worker_interleaved_policy_methods(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    methods = ["dense", "dgc", *POLICY_METHODS]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "launch" / "bench_bandwidth.py"), "worker", "--model", "tiny", "--interleave",
        "--compute", "sleep", "--compute-s", "0.01", "--methods", ",".join(methods), "--steps", "2",
        "--local-steps", "0", "--replay", "1", "--replay-budget-s", "0", "--threads", "1",
        "--out", str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=140, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["node_groups"] == [[0, 1]] and data["meta"]["procs_per_node"] == 2
    by = {m["method"]: m for m in data["methods"]}
    assert list(by) == methods
    for m in by.values():
        assert m["step_s"] >= 0.01 and m["tx_bytes"] > 0  # the sleep is in every step
    dense = 4 * 7224
    assert by["dense"]["payload_bytes"] == by["dgc-dense"]["payload_bytes"] == dense
    assert by["dgc"]["payload_bytes"] < by["dgc@0.25"]["payload_bytes"] < dense
    for name in ("dgc-auto", "dgc-auto@0.25"):
        assert by[name]["sparse_buckets"] is not None and len(by[name]["sparse_buckets"]) >= 1
        sparse = all(by[name]["sparse_buckets"])
        assert sparse == any(op["op"] == "all_gather_single" for op in by[name]["ops"])
    assert by["dgc"]["sparse_buckets"] is None


# --------------------------------------------------------------------- quantized methods (issue 15)
def test_method_registry_has_the_quantized_methods() -> None:
    from dgc.bench.bandwidth.cost_model import copies, least_wire_bytes
    from dgc.bench.bandwidth.methods import QUANT_METHODS, MethodContext
    from dgc.quant import QuantConfig
    from dgc.training.quant_communication import QuantCommunication

    ctx = MethodContext(backend="gloo")
    for name, bits in (("int8", 8), ("terngrad", 2), ("qsgd", 4)):
        assert name in QUANT_METHODS
        comm = bandwidth.METHODS[name].build(ctx)
        assert isinstance(comm, QuantCommunication) and comm.name == name
        cfg = comm.quant_config
        assert isinstance(cfg, QuantConfig) and cfg.method == name
        assert cfg.error_feedback and not cfg.rounding_is_stochastic
        assert cfg.quantizer().bits == bits
        assert bandwidth.METHODS[name].build(ctx) is not comm  # fresh state per run
    assert "dgc-int8" in QUANT_METHODS
    assert bandwidth.METHODS["dgc-int8"].build(ctx).config.value_dtype == "int8"
    assert bandwidth.METHODS["dgc-int8"].build(ctx).config.density == 0.001
    # The two phases send the bytes of a ring allreduce of the quantized gradient.
    ops = [{"op": "all_to_all_single", "bytes": 400}, {"op": "all_gather_single", "bytes": 100}]
    assert copies(ops, 4) == 2 * 3 / 4
    assert least_wire_bytes(ops, 4) == 400 * 3 / 4 + 100 * 3
    assert copies([{"op": "all_gather_single", "bytes": 8}], 4) == 3


@pytest.mark.timeout(120)
def test_quantized_methods_byte_counts(tmp_path: Path) -> None:
    from dgc.bench.bandwidth.methods import MethodContext
    from dgc.quant.exchange import ExchangePlan

    methods = ["int8", "terngrad", "qsgd"]
    results = run_distributed(_bench_worker, 2, methods, str(tmp_path / "init"), timeout=110)
    n = 2
    params = dict(grad_shapes.build("tiny").named_parameters())
    ctx = MethodContext(backend="gloo")
    for res in results:
        for name in methods:
            r = res[name]
            quantizer = bandwidth.METHODS[name].build(ctx).quant_config.quantizer()
            assert len(r["buckets"]) >= 2, "the tiny bucket cap should give several buckets"
            plans = [ExchangePlan.of(sum(params[p].numel() for p in b), n, quantizer)
                     for b in r["buckets"]]
            # Per bucket: the all-to-all of N messages (own slot included), then the all-gather
            # of the own one; the bucket order of the calls is not fixed, so compare sorted.
            a2a = sorted(n * p.message_bytes for p in plans)
            ag = sorted(p.message_bytes for p in plans)
            assert sorted(op["bytes"] for op in r["ops"] if op["op"] == "all_to_all_single") == a2a
            assert sorted(op["bytes"] for op in r["ops"] if op["op"] == "all_gather_single") == ag
            assert {op["op"] for op in r["ops"]} == {"all_to_all_single", "all_gather_single"}
            assert r["payload_bytes"] == sum(a2a) + sum(ag)
            assert r["payload_bytes"] < 4 * sum(p.numel() for p in params.values())
            raw_tx = r["tx_bytes"] + r["barrier_tx_bytes"]  # lo: both ranks' traffic
            assert raw_tx >= n * (n - 1) * sum(ag) * 2


@pytest.mark.parametrize("method", ["int8", "terngrad", "qsgd", "dgc-int8"])
def test_parity_rows_for_the_quantized_methods_compose(method: str) -> None:
    """launch/parity.py's new rows: the overrides it passes compose with the task's experiment and
    build the training loop's class with the intended settings."""
    from hydra.utils import instantiate
    from test_conf_compose import _compose

    from dgc.bench import parity
    from dgc.quant import QuantConfig

    task = parity.TASKS["mnist"]
    cmd = parity.command(task, method, 4, Path("/tmp/run"), [])
    overrides = [a for a in cmd if "=" in a and not a.startswith(("--", "hydra."))]
    assert overrides[0] == f"experiment={task.experiment}"
    # DGC-based rows get the task's density warm-up like dgc and topk; the quantized ones do not.
    assert ("compress.warmup_epochs=1" in overrides) == (method == "dgc-int8")
    comm = instantiate(_compose(*overrides).compress)
    if method == "dgc-int8":
        assert comm.config.value_dtype == "int8" and comm.config.density == 0.001
    else:
        assert isinstance(comm.quant_config, QuantConfig) and comm.quant_config.method == method


def test_dense_hook_method_registers_pytorchs_python_allreduce_hook() -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from dgc.bench.bandwidth.methods import MethodContext

    comm = bandwidth.METHODS["dense-hook"].build(MethodContext(backend="gloo"))
    registered = []

    class FakeDDP:
        module = torch.nn.Linear(3, 2)

        def register_comm_hook(self, state, hook) -> None:
            registered.append((state, hook))

    comm.attach_ddp(FakeDDP(), None)
    assert registered == [(None, default_hooks.allreduce_hook)]
    assert comm.step_stats().bytes_sent == 4 * (3 * 2 + 2)  # every element, as dense
