"""int8 values on the wire (``DGCConfig(value_dtype="int8")``): codes in [-127, 127] with one float32 scale
per tensor, the rounding error kept in the residual, so that for every tensor at every step what the
receivers add plus the residuals equals the sum of the momentum-corrected gradients.

One process (N workers simulated by N states), the codec on one rank, then real 2-rank gloo DDP groups
and a 2-rank Horovod run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from _dist import run_distributed
from ddp_workers import Scenario, run_scenario
from hypothesis import given, settings
from hypothesis import strategies as st

import dgc
from dgc.compressor import dense_scale
from dgc.wire import INT8_LEVELS, MessageView, dequantize_int8

ROOT = Path(__file__).resolve().parents[1]


def _states(n_workers: int, shape: tuple[int, ...], **cfg) -> list[dgc.DGCState]:
    config = dgc.DGCConfig(dense_steps=0, min_compress_numel=1, value_dtype="int8", **cfg)
    if len(shape) == 1:  # vectors always go dense; a 1 x n matrix is compressible
        shape = (1, *shape)
    return [dgc.DGCState(config, [("w", nn.Parameter(torch.zeros(shape)))]) for _ in range(n_workers)]


def _step(states: list[dgc.DGCState], grads: list[torch.Tensor]) -> torch.Tensor:
    """One communication step of N simulated workers; returns the averaged update (of dequantized values)."""
    n = len(states)
    packed = [s.compress("w", g.clone()) for s, g in zip(states, grads, strict=True)]
    for p in packed:
        assert p.values.dtype == torch.int8 and p.scale is not None and p.scale.dtype == torch.float32
    idx = torch.cat([p.indices for p in packed])
    val = torch.cat([p.sent for p in packed])
    out = states[0].decompress("w", idx, val, n).reshape(-1)
    for s in states:
        s.end_step()
    return out


@settings(max_examples=40, deadline=None)
@given(
    workers=st.integers(1, 4),
    numel=st.integers(2, 3000),
    density=st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0]),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    nesterov=st.booleans(),
    masking=st.booleans(),
    ratio=st.sampled_from([0.01, 1.0]),
    magnitude=st.sampled_from([1e-6, 1.0, 1e4]),
    seed=st.integers(0, 1000),
)
def test_conservation_invariant_int8(workers, numel, density, momentum, nesterov, masking, ratio, magnitude, seed):
    """(sum of everything sent)/N + (sum of residuals)/N == sum over steps of the corrected average."""
    states = _states(workers, (numel,), density=density, momentum=momentum, nesterov=nesterov,
                     momentum_masking=masking, sample_ratio=ratio)
    gen = torch.Generator().manual_seed(seed)
    sent_total = torch.zeros(numel, dtype=torch.float64)
    corrected_total = torch.zeros(numel, dtype=torch.float64)
    for _ in range(5):
        grads = [torch.randn(numel, generator=gen) * magnitude for _ in range(workers)]
        for s, g in zip(states, grads, strict=True):
            u = s.memory["w"].momentum
            if u is None:
                corrected_total += g.double() / workers
            elif nesterov:
                corrected_total += (momentum * (u + g) + g).double() / workers
            else:
                corrected_total += (momentum * u + g).double() / workers
        sent_total += _step(states, grads).double()
        residual = sum(s.memory["w"].residual.double() for s in states) / workers
        torch.testing.assert_close(sent_total + residual, corrected_total, atol=1e-5 * magnitude, rtol=1e-5)


def test_codes_scale_and_rounding_error_kept() -> None:
    (s,) = _states(1, (1000,), density=0.1, momentum=0.0)
    g = torch.randn(1000) * 1.2345
    c = s.compress("w", g.clone())
    idx = c.indices.long()
    assert c.values.dtype == torch.int8 and c.values.abs().max().item() == INT8_LEVELS
    assert c.scale.item() == pytest.approx(g[idx].abs().max().item() / INT8_LEVELS, rel=1e-6)
    torch.testing.assert_close(c.sent, c.values.float() * c.scale, rtol=0, atol=0)
    left = s.memory["w"].residual[idx]
    # The kernel cleared v[sel]; the quantization error went back, exactly (Sterbenz: no rounding).
    torch.testing.assert_close(left, g[idx] - c.sent, rtol=0, atol=0)
    assert left.abs().max() > 0, "int8 must round something"
    assert left.abs().max() <= c.scale / 2 * (1 + 1e-6)  # round to nearest
    # Deterministic: the same input gives the same codes and scale.
    (t,) = _states(1, (1000,), density=0.1, momentum=0.0)
    d = t.compress("w", g.clone())
    assert torch.equal(c.values, d.values) and torch.equal(c.scale, d.scale)


@pytest.mark.parametrize("dense", [False, True])
def test_zero_tensor_sends_zeros_never_a_nan_scale(dense: bool) -> None:
    (s,) = _states(1, (200,), density=0.05, momentum=0.9)
    g = torch.zeros(1, 200)
    if dense:
        out = s.compress_dense("w", g.clone())
        scale = dense_scale(s.memory["w"])
        codes = out
        s.finish_dense("w", out.dtype, True)
    else:
        c = s.compress("w", g.clone())
        scale, codes = c.scale, c.values
        assert torch.equal(c.sent, torch.zeros(10))
    assert codes.dtype == torch.int8 and not codes.any()
    assert scale.item() == 0.0
    assert torch.equal(s.memory["w"].residual, torch.zeros(200))


@pytest.mark.parametrize("pruned", [False, True])
def test_dense_path_int8_keeps_the_rounding_error(pruned: bool) -> None:
    (s,) = _states(1, (40, 50), density=0.1, momentum=0.9)
    mask = torch.rand(40, 50, generator=torch.Generator().manual_seed(3)) > 0.3
    if pruned:
        s.set_masks({"w": mask})
    mem = s.memory["w"]
    total = torch.zeros(2000)
    sent_total = torch.zeros(2000)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        g = torch.randn(40, 50, generator=gen)
        u = mem.momentum.clone()
        corrected = 0.9 * u + g.reshape(-1)
        total += corrected * mask.reshape(-1) if pruned else corrected
        out = torch.empty(mem.live, dtype=torch.int8)
        s.compress_dense("w", g.clone(), out=out)
        scale = dense_scale(mem)
        assert scale.item() == pytest.approx(mem.residual.abs().max().item() / INT8_LEVELS)
        sent = torch.zeros(2000)
        where = torch.nonzero(mask.reshape(-1)).reshape(-1) if pruned else torch.arange(2000)
        sent[where] = dequantize_int8(out, scale)
        s.finish_dense("w", torch.int8, True)
        sent_total += sent
        assert (sent != mem.residual).any()
        torch.testing.assert_close(sent_total + mem.residual, total, rtol=1e-6, atol=1e-5)
    if pruned:
        assert not mem.residual[~mask.reshape(-1)].any()


def _codec_state(fmt: str, **cfg) -> tuple[dgc.DGCState, tuple[str, ...]]:
    torch.manual_seed(0)
    params = [("a", nn.Parameter(torch.zeros(40, 50))), ("b", nn.Parameter(torch.zeros(30))),
              ("c", nn.Parameter(torch.zeros(70, 20))), ("d", nn.Parameter(torch.zeros(5)))]
    config = dgc.DGCConfig(dense_steps=0, min_compress_numel=16, density=0.02, value_dtype="int8",
                           index_format=fmt, **cfg)
    return dgc.DGCState(config, params), ("a", "b", "c", "d")


@pytest.mark.parametrize("fmt", ["int32", "block16", "bitmap"])
def test_codec_message_round_trip_one_rank(fmt: str) -> None:
    """The codec on one rank: what decode writes plus the residuals is what came in; the message holds
    one float32 scale per tensor; undo puts back exactly what was sent."""
    state, names = _codec_state(fmt, momentum=0.0)
    layout = state.codec.layout(names)
    assert layout.quantized and layout.scale_count == 4 and layout.index_format == fmt
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(2000 + 30 + 1400 + 5, generator=gen)
    buf = g.clone()
    send = state.codec.encode(layout, buf)
    assert send.message.numel() == layout.message_bytes
    view = MessageView.of(send.message, layout)
    assert view.values.dtype == torch.int8 and view.dense.dtype == torch.int8
    # Each tensor's scale is max|what it sends| / 127.
    assert view.scales[1].item() == pytest.approx(g[2000:2030].abs().max().item() / INT8_LEVELS)
    for i in (0, 2):  # the sparse ones: the largest |g| of the tensor
        o, n = layout.offsets[i], layout.numels[i]
        assert view.scales[i].item() == pytest.approx(g[o : o + n].abs().max().item() / INT8_LEVELS)
    state.codec.decode(send, send.message.clone())
    v_before = torch.cat([state.memory[n].residual.clone() for n in names])
    send.undo(state)  # as if another rank failed: the pairs are back, the dense payloads never left
    v_undone = torch.cat([state.memory[n].residual for n in names])
    torch.testing.assert_close(v_undone[:2000], g[:2000], rtol=0, atol=0)
    state.memory["a"].residual.copy_(v_before[:2000])
    state.memory["c"].residual.copy_(v_before[2030:3430])
    send.commit(state)
    v = torch.cat([state.memory[n].residual for n in names])
    torch.testing.assert_close(buf + v, g, rtol=0, atol=1e-6)
    assert (buf != g).any()  # int8 really rounded


def test_nonfinite_gradient_is_flagged_not_quantized() -> None:
    state, names = _codec_state("auto", momentum=0.9)
    layout = state.codec.layout(names)
    buf = torch.randn(3435)
    buf[7] = float("nan")
    send = state.codec.encode(layout, buf)
    assert not send.finite
    assert all(not state.memory[n].residual.any() for n in names)
    assert state.codec.decode(send, send.message.clone()) is not None
    assert torch.isfinite(MessageView.of(send.message, layout).scales).all()


def test_config_int8_and_bad_dtypes() -> None:
    assert dgc.DGCConfig(value_dtype="int8").wire_dtype == torch.int8
    assert dgc.DGCConfig(value_dtype=torch.int8).value_dtype == "int8"
    for bad in ("int4", "uint8", torch.float64):
        with pytest.raises(ValueError, match="value_dtype"):
            dgc.DGCConfig(value_dtype=bad)


# --------------------------------------------------------------------------- 2 ranks, real DDP (gloo)
SPARSE = dict(density=0.05, momentum=0.9, min_compress_numel=16, dense_steps=2, value_dtype="int8")


def _scenarios_worker(rank: int, world: int, scenarios: list[Scenario]) -> list[dict]:
    return [run_scenario(rank, world, sc) for sc in scenarios]


@pytest.fixture(scope="module")
def ddp_runs() -> dict[str, list[dict]]:
    scenarios = {
        "int8": Scenario(model="conv", dgc=dict(SPARSE), steps=6, bucket_cap_mb=0.01),
        "float16": Scenario(model="conv", dgc=dict(SPARSE, value_dtype="float16"), steps=6, bucket_cap_mb=0.01),
        "warmup": Scenario(model="conv", dgc=dict(SPARSE, warmup_steps=4, density=0.01, nesterov=True),
                           steps=7, gradient_as_bucket_view=True),
        "nan": Scenario(model="conv", dgc=dict(SPARSE), nan_at=(3, 1), bucket_cap_mb=0.01),
        "unused": Scenario(model="conv", dgc=dict(SPARSE), find_unused=True, extra_until=3, steps=7,
                           bucket_cap_mb=0.01),
        # one bucket: the unused bias is a dense part of a sparse message (int8 codes given back)
        "unused_one_bucket": Scenario(model="conv", dgc=dict(SPARSE), find_unused=True, extra_until=3, steps=7),
        "bf16": Scenario(model="conv", dgc=dict(SPARSE), dtype="bfloat16", bucket_cap_mb=0.01),
    }
    per_rank = run_distributed(_scenarios_worker, 2, list(scenarios.values()), timeout=200)
    return {name: [r[i] for r in per_rank] for i, name in enumerate(scenarios)}


def _identical(results: list[dict]) -> None:
    for r in results[1:]:
        for n, p in results[0]["params"].items():
            assert torch.equal(p, r["params"][n]), f"parameter {n} differs between ranks"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["int8", "warmup", "unused", "unused_one_bucket"])
def test_ddp_int8_invariant_and_identical_ranks(ddp_runs, name: str) -> None:
    results = ddp_runs[name]
    for r in results:
        assert r["errors"] == []
        assert r["max_rel_err"] < 1e-5, r["max_rel_err"]
        assert r["residual_finite"]
    _identical(results)
    assert results[0]["stats"][-1]["sparse_buckets"] > 0


@pytest.mark.timeout(240)
def test_ddp_int8_message_smaller_than_float16(ddp_runs) -> None:
    int8, half = ddp_runs["int8"][0]["stats"][-1], ddp_runs["float16"][0]["stats"][-1]
    assert int8["elements_sent"] == half["elements_sent"] > 0
    assert int8["bytes_sent"] < half["bytes_sent"]
    assert int8["bytes_received"] == 2 * int8["bytes_sent"]
    # Close to float32-quality training: the int8 run's parameters stay near the float16 run's.
    for n, p in ddp_runs["int8"][0]["params"].items():
        torch.testing.assert_close(p, ddp_runs["float16"][0]["params"][n], atol=2e-2, rtol=0)


@pytest.mark.timeout(240)
def test_ddp_int8_nonfinite_keeps_residuals(ddp_runs) -> None:
    for r in ddp_runs["nan"]:
        assert len(r["errors"]) == 1 and "non-finite gradient" in r["errors"][0], r["errors"]
        assert r["residual_finite"]
        assert r["max_rel_err"] < 1e-5


@pytest.mark.timeout(240)
def test_ddp_int8_half_precision_gradients(ddp_runs) -> None:
    for r in ddp_runs["bf16"]:
        assert r["errors"] == [] and r["residual_finite"]
        assert r["max_rel_err"] < 2e-2  # the gradients themselves are rounded to 8 bits
    _identical(ddp_runs["bf16"])


# ------------------------------------------------------------------------ 2 ranks, Horovod (gloo)
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_horovod_int8_invariant_and_identical_ranks(tmp_path: Path) -> None:
    from test_horovod import _free_port, _horovodrun, _need_horovod

    _need_horovod()
    out = tmp_path / "int8.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DGC_TEST_PORT=str(_free_port()))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    cmd = [*_horovodrun(), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
           str(Path(__file__).parent / "int8_workers.py"), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert result["sparse_steps"] >= 3
    assert result["max_rel_err"] < 1e-5, result
    assert result["max_rank_diff"] == 0.0
    assert result["wire_dtype"] == "torch.int8"
