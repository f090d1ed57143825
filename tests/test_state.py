"""DGCState and the per-tensor compressor, in one process (N workers simulated by N states)."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import dgc


def _states(n_workers: int, shape: tuple[int, ...], **cfg) -> list[dgc.DGCState]:
    config = dgc.DGCConfig(dense_steps=0, min_compress_numel=1, **cfg)
    if len(shape) == 1:  # vectors always go dense; a 1 x n matrix is compressible
        shape = (1, *shape)
    return [dgc.DGCState(config, [("w", nn.Parameter(torch.zeros(shape)))]) for _ in range(n_workers)]


def _step(states: list[dgc.DGCState], grads: list[torch.Tensor]) -> torch.Tensor:
    """One communication step of N simulated workers; returns the averaged update."""
    n = len(states)
    packed = [s.compress("w", g.clone()) for s, g in zip(states, grads, strict=True)]
    idx = torch.cat([p.indices for p in packed])
    val = torch.cat([p.values for p in packed])
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
    wire=st.sampled_from(["float32", "float16", "bfloat16"]),
    ratio=st.sampled_from([0.01, 1.0]),
    seed=st.integers(0, 1000),
)
def test_conservation_invariant(workers, numel, density, momentum, nesterov, masking, wire, ratio, seed):
    """(sum of everything sent)/N + (sum of residuals)/N == sum over steps of the corrected average."""
    states = _states(
        workers,
        (numel,),
        density=density,
        momentum=momentum,
        nesterov=nesterov,
        momentum_masking=masking,
        value_dtype=wire,
        sample_ratio=ratio,
    )
    gen = torch.Generator().manual_seed(seed)
    sent_total = torch.zeros(numel, dtype=torch.float64)
    corrected_total = torch.zeros(numel, dtype=torch.float64)
    for _ in range(5):
        grads = [torch.randn(numel, generator=gen) for _ in range(workers)]
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
        torch.testing.assert_close(sent_total + residual, corrected_total, atol=1e-5, rtol=1e-5)


def test_exactly_k_pairs_of_largest_residual():
    (s,) = _states(1, (1000,), density=0.01, momentum=0.0)
    g = torch.randn(1000)
    c = s.compress("w", g.clone())
    assert c.indices.dtype == torch.int32 and c.indices.numel() == 10
    assert set(c.indices.tolist()) == set(torch.topk(g.abs(), 10).indices.tolist())
    assert torch.equal(c.values, g[c.indices.long()])
    assert torch.all(s.memory["w"].residual[c.indices.long()] == 0)  # sent => cleared


def test_momentum_factor_masking():
    (s,) = _states(1, (1000,), density=0.01, momentum=0.9)
    c = s.compress("w", torch.randn(1000))
    u = s.memory["w"].momentum
    assert torch.all(u[c.indices.long()] == 0)
    assert (u != 0).sum() == 1000 - 10
    (s2,) = _states(1, (1000,), density=0.01, momentum=0.9, momentum_masking=False)
    s2.compress("w", torch.randn(1000))
    assert (s2.memory["w"].momentum != 0).sum() == 1000


def test_half_wire_keeps_rounding_error_in_residual():
    (s,) = _states(1, (1000,), density=0.1, momentum=0.0, value_dtype="float16")
    g = torch.randn(1000) * 1.2345
    c = s.compress("w", g.clone())
    assert c.values.dtype == torch.float16
    idx = c.indices.long()
    left = s.memory["w"].residual[idx]
    torch.testing.assert_close(left, g[idx] - c.values.float(), atol=0, rtol=0)
    assert left.abs().max() > 0


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
@pytest.mark.parametrize("dense", [False, True])
def test_half_wire_saturates_and_keeps_the_excess(wire, dense):
    """An entry beyond the wire dtype's range (GradScaler-scaled gradients pass 65,504 easily) sends the
    largest finite value and keeps the rest in the residual: never inf on the wire, never -inf left."""
    limit = torch.finfo(getattr(torch, wire)).max
    big = 1e5 if wire == "float16" else 3.4e38
    (s,) = _states(1, (1000,), density=0.002, momentum=0.0, value_dtype=wire)
    g = torch.zeros(1, 1000)
    g[0, 3], g[0, 7] = big, -big
    if dense:
        out = s.compress_dense("w", g.clone())
        sent = out.reshape(-1)[[3, 7]]
        s.finish_dense("w", out.dtype, True)
    else:
        c = s.compress("w", g.clone())
        assert sorted(c.indices.tolist()) == [3, 7]
        sent = c.values[c.indices.argsort()]
    assert sent.tolist() == [limit, -limit]
    v = s.memory["w"].residual
    assert torch.isfinite(v).all()
    assert v[3].item() == torch.tensor(big).sub(limit).item() and v[7].item() == -v[3].item()
    # Nothing lost: what was sent plus what is left is what came in.
    torch.testing.assert_close(sent.float() + v[[3, 7]], g.reshape(-1)[[3, 7]], rtol=1e-7, atol=0)


def test_masks_never_selected_and_state_stays_zero():
    (s,) = _states(2, (40, 50), density=0.5, momentum=0.9)[:1]
    mask = torch.rand(40, 50, generator=torch.Generator().manual_seed(0)) > 0.7
    s.set_masks({"w": mask})
    assert s.k_for("w") == -(-int(mask.sum()) // 2)
    for _ in range(4):
        c = s.compress("w", torch.randn(40, 50) * 10)
        assert mask.reshape(-1)[c.indices.long()].all()
        s.end_step()
    m = s.memory["w"]
    assert torch.all(m.residual[~mask.reshape(-1)] == 0)
    assert torch.all(m.momentum[~mask.reshape(-1)] == 0)
    # Fewer live entries than k at density 1: only live ones are sent.
    (s1,) = _states(1, (100,), density=1.0, momentum=0.0)
    s1.set_masks({"w": torch.arange(100) < 7})
    c = s1.compress("w", torch.randn(100))
    assert sorted(c.indices.tolist()) == list(range(7))


def test_local_clipping_scales_by_world_size():
    (s,) = _states(1, (100,), density=1.0, momentum=0.0, clip_norm=1.0)
    g = torch.ones(100) * 10
    c = s.compress("w", g.clone())
    assert torch.linalg.vector_norm(c.values).item() == pytest.approx(1.0, rel=1e-4)


def test_state_dict_round_trip_weights_only():
    states = _states(1, (30, 40), density=0.1, momentum=0.9)
    s = states[0]
    s.set_masks({"w": torch.rand(30, 40) > 0.2})
    for _ in range(3):
        s.compress("w", torch.randn(30, 40))
        s.end_step()
    sd = s.state_dict()
    # The contract's layout: per parameter name its momentum and residual, plus the step.
    assert sd["step"] == 3 and sd["world_size"] == 1 and sd["rank"] == 0
    assert set(sd) == {"w", "step", "world_size", "rank", "config"}
    assert torch.equal(sd["w"]["momentum"], s.memory["w"].momentum.view(30, 40))
    assert torch.equal(sd["w"]["residual"], s.memory["w"].residual.view(30, 40))
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    (t,) = _states(1, (30, 40), density=0.1, momentum=0.9)
    t.load_state_dict(loaded)
    assert t.step == 3
    for attr in ("residual", "momentum", "mask"):
        assert torch.equal(getattr(t.memory["w"], attr), getattr(s.memory["w"], attr))
    # Both continue identically.
    g = torch.randn(30, 40)
    a, b = s.compress("w", g.clone()), t.compress("w", g.clone())
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)


def test_load_state_dict_reads_the_nested_layout_of_earlier_versions():
    (s,) = _states(1, (30, 40), density=0.1, momentum=0.9)
    s.compress("w", torch.randn(30, 40))
    s.end_step()
    sd = s.state_dict()
    legacy = {k: sd[k] for k in ("step", "world_size", "rank", "config")} | {"params": {"w": sd["w"]}}
    (t,) = _states(1, (30, 40), density=0.1, momentum=0.9)
    t.load_state_dict(legacy)
    assert t.step == 1 and torch.equal(t.memory["w"].residual, s.memory["w"].residual)


def test_state_dict_refuses_a_parameter_named_like_its_own_keys():
    st_ = dgc.DGCState(dgc.DGCConfig(), [("step", nn.Parameter(torch.zeros(4, 4)))])
    with pytest.raises(ValueError, match="'step'.*rename"):
        st_.state_dict()


def test_load_state_dict_mismatches_are_named():
    (s,) = _states(1, (30, 40), density=0.1)
    sd = s.state_dict()
    (other,) = _states(1, (30, 41), density=0.1)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(sd)
    renamed = dgc.DGCState(s.config, [("v", nn.Parameter(torch.zeros(30, 40)))])
    with pytest.raises(ValueError, match="names"):
        renamed.load_state_dict(sd)
    with pytest.raises(ValueError, match="world size 4"):
        s.load_state_dict({**sd, "world_size": 4})
    with pytest.raises(ValueError, match="rank 3"):
        s.load_state_dict({**sd, "rank": 3})
    (no_momentum,) = _states(1, (30, 40), density=0.1, momentum=0.0)
    with pytest.raises(ValueError, match="momentum"):
        no_momentum.load_state_dict(sd)
    with pytest.raises(ValueError, match="not a DGC state_dict"):
        s.load_state_dict({"w": sd["w"]})


def test_pickle_drops_process_group_and_needs_bind():
    p = nn.Parameter(torch.zeros(8, 8))
    s = dgc.DGCState(dgc.DGCConfig(), [("w", p)], process_group=object())  # stand-in for a group
    s.compress_dense("w", torch.ones(8, 8))
    t = pickle.loads(pickle.dumps(s))
    assert t.process_group is None
    assert torch.equal(t.memory["w"].momentum, s.memory["w"].momentum)
    with pytest.raises(RuntimeError, match="bind"):
        t.name_of(p)
    t.bind([("w", p)])
    assert t.name_of(p) == "w"


def test_state_construction_errors():
    with pytest.raises(ValueError, match="named_parameters"):
        dgc.DGCState(dgc.DGCConfig(), [])
    with pytest.raises(TypeError, match="DGCConfig"):
        dgc.DGCState({"density": 0.1}, [("w", nn.Parameter(torch.zeros(2)))])
    st_ = dgc.DGCState(dgc.DGCConfig(), [("w", nn.Parameter(torch.zeros(4, 4)))])
    with pytest.raises(KeyError):
        st_.set_masks({"nope": torch.ones(16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="elements"):
        st_.set_masks({"w": torch.ones(15, dtype=torch.bool)})


def test_small_and_vector_tensors_go_dense():
    cfg = dgc.DGCConfig(dense_steps=0, min_compress_numel=100)
    s = dgc.DGCState(
        cfg,
        [
            ("big", nn.Parameter(torch.zeros(20, 20))),
            ("bias", nn.Parameter(torch.zeros(1000))),
            ("tiny", nn.Parameter(torch.zeros(5, 5))),
        ],
    )
    assert s.is_compressed("big") and not s.is_compressed("bias") and not s.is_compressed("tiny")
