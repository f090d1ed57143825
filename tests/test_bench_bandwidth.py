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
