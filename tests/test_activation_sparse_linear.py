"""SparseInputLinear gives nn.Linear's results, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dgc.activation import SparseInputLinear, convert_to_sparse_input, sparse_input_linear
from dgc.activation.break_even import (
    DEFAULT_MIN_SPARSITY,
    measure_break_even,
    predicted_break_even,
    sparse_input,
)


def _pair(in_f: int, out_f: int, bias: bool = True, **kw) -> tuple[nn.Linear, SparseInputLinear]:
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=bias).double()
    sparse = SparseInputLinear(in_f, out_f, bias=bias, **kw).double()
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def _grads(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(gy)
    return y.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 40), in_f=st.integers(1, 48), out_f=st.integers(1, 24),
       sparsity=st.floats(0.0, 1.0), bias=st.booleans(), seed=st.integers(0, 999))
def test_full_mode_equals_nn_linear_forward_and_backward(batch, in_f, out_f, sparsity, bias, seed):
    dense, sparse = _pair(in_f, out_f, bias, min_sparsity=0.0, input_grad="full")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_f, generator=g, dtype=torch.float64)
    x[:, torch.randperm(in_f, generator=g)[: round(sparsity * in_f)]] = 0
    gy = torch.randn(batch, out_f, generator=g, dtype=torch.float64)
    for a, b in zip(_grads(dense, x, gy), _grads(sparse, x, gy), strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    zero_features = (x == 0).all(0)
    assert sparse.last_feature_sparsity == pytest.approx(zero_features.float().mean().item())
    assert sparse.last_sparse == bool(zero_features.any())


def test_active_mode_exact_after_relu_and_zero_outside_active_features():
    torch.manual_seed(0)
    z = torch.randn(64, 32, dtype=torch.float64)
    z[:, ::3] = -z[:, ::3].abs() - 0.1  # a third of the features are dead after the ReLU
    gy = torch.randn(64, 16, dtype=torch.float64)
    dense, sparse = _pair(32, 16, min_sparsity=0.0, input_grad="active")
    results = []
    for layer in (dense, sparse):
        zz = z.clone().requires_grad_()
        y = layer(torch.relu(zz))
        y.backward(gy)
        results.append((y.detach(), zz.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert sparse.last_sparse and sparse.last_feature_sparsity == pytest.approx(11 / 32)
    # Direct input gradient: zero on the inactive features, nn.Linear's on the active ones.
    x = torch.relu(z)
    _, gx, _, _ = _grads(sparse, x, gy)
    _, gx_dense, _, _ = _grads(dense, x, gy)
    active = (x != 0).any(0)
    assert (gx[:, ~active] == 0).all()
    torch.testing.assert_close(gx[:, active], gx_dense[:, active])


def test_3d_input_float32_and_dense_fallback():
    dense, sparse = _pair(16, 8, min_sparsity=0.5)
    dense, sparse = dense.float(), sparse.float()
    x = torch.randn(2, 5, 16)
    x[..., :12] = 0  # 75% >= 50%: sparse path
    torch.testing.assert_close(sparse(x), dense(x))
    assert sparse.last_sparse
    x[..., :4] = 1.0  # 50% ... still sparse
    sparse(x)
    assert sparse.last_sparse
    x[..., 4:6] = 1.0  # 37.5% < 50%: dense path
    torch.testing.assert_close(sparse(x), dense(x))
    assert not sparse.last_sparse
    always_dense = SparseInputLinear(16, 8, min_sparsity=1.0)
    always_dense(torch.zeros(3, 16))
    assert not always_dense.last_sparse


def test_active_features_counts_nan_and_not_negative_zero():
    from dgc.activation.sparse_linear import active_features

    x = torch.zeros(3, 5)
    x[1, 1] = float("nan")
    x[:, 2] = -0.0
    x[2, 3] = -1e-30
    x[0, 4] = float("inf")
    assert active_features(x).tolist() == [1, 3, 4]


def test_weight_gradient_scattered_into_full_shape():
    x = torch.zeros(4, 6, dtype=torch.float64)
    x[:, [1, 4]] = torch.randn(4, 2, dtype=torch.float64)
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([1, 4])
    sparse_input_linear(x, w, b, idx).sum().backward()
    assert w.grad.shape == (3, 6)
    assert (w.grad[:, [0, 2, 3, 5]] == 0).all() and (w.grad[:, [1, 4]] != 0).all()


def test_from_linear_shares_parameters_and_convert():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.0), nn.Linear(8, 4),
                          nn.Tanh(), nn.Linear(4, 2))
    params = list(model.parameters())
    names = convert_to_sparse_input(model)
    assert names == ["0", "3", "5"]
    assert all(isinstance(model[i], SparseInputLinear) for i in (0, 3, 5))
    assert [p is q for p, q in zip(params, model.parameters(), strict=True)] == [True] * 6
    assert model[0].input_grad == "full"  # network input: no ReLU before it
    assert model[3].input_grad == "active"  # ReLU -> Dropout -> Linear
    assert model[5].input_grad == "full"  # tanh has a nonzero derivative at 0
    assert convert_to_sparse_input(nn.Sequential(nn.Linear(2, 2)), exclude=["0"]) == []
    with pytest.raises(ValueError, match="input_grad"):
        SparseInputLinear(2, 2, input_grad="half")
    with pytest.raises(ValueError, match="min_sparsity"):
        SparseInputLinear(2, 2, min_sparsity=1.5)


def test_measure_break_even_reports_timings():
    r = measure_break_even(batch=32, in_features=64, out_features=64, sparsities=(0.5, 0.9),
                           repeats=1)
    assert len(r.dense_s) == len(r.sparse_s) == len(r.speedup) == 2
    assert all(t > 0 for t in r.dense_s + r.sparse_s + r.speedup)
    assert r.break_even in (0.5, 0.9, 1.0)
    x = sparse_input(16, 100, 0.3)
    assert (x == 0).all(0).sum() == 30


# --- Routing: cheap conditions first, the zero check only where the sparse path can pay ---


def _count_checks(monkeypatch) -> list[int]:
    """Replace the zero check by a counting wrapper; returns the call counter."""
    import dgc.activation.sparse_linear as sl

    calls = [0]
    real = sl.active_features

    def counting(x):
        calls[0] += 1
        return real(x)

    monkeypatch.setattr(sl, "active_features", counting)
    return calls


def test_min_sparsity_one_never_looks_at_the_input(monkeypatch):
    calls = _count_checks(monkeypatch)
    dense, sparse = _pair(64, 32, min_sparsity=1.0)
    x = torch.zeros(16, 64, dtype=torch.float64)
    x[:, :3] = torch.randn(16, 3, dtype=torch.float64)  # 95% zero features: still dense
    for batch in (16, 16, 8, 16):  # also across input sizes
        gy = torch.randn(batch, 32, dtype=torch.float64)
        for a, b in zip(_grads(dense, x[:batch], gy), _grads(sparse, x[:batch], gy),
                        strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert not sparse.last_sparse
    assert calls[0] == 0
    assert sparse.last_feature_sparsity is None


@pytest.mark.parametrize("shape", [(32, 128, 10), (32, 3136, 128), (16, 64, 64), (4, 2048, 2048)])
def test_small_layers_run_dense_without_the_zero_check(monkeypatch, shape):
    """The default cost model sends small layers (and small batches) to F.linear before any
    tensor op, even with 95% of the features zero."""
    calls = _count_checks(monkeypatch)
    batch, in_f, out_f = shape
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f)
    sparse = SparseInputLinear.from_linear(dense, input_grad="active")
    x = sparse_input(batch, in_f, 0.95)
    gy = torch.randn(batch, out_f)
    for _ in range(20):
        for a, b in zip(_grads(dense, x, gy), _grads(sparse, x, gy), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert not sparse.last_sparse
    assert calls[0] == 0


def test_check_every_skips_the_check_below_the_threshold(monkeypatch):
    calls = _count_checks(monkeypatch)
    dense, sparse = _pair(32, 8, min_sparsity=0.5, check_every=4)
    x_dense = torch.randn(6, 32, dtype=torch.float64)
    x_sparse = x_dense.clone()
    x_sparse[:, 4:] = 0
    gy = torch.randn(6, 8, dtype=torch.float64)
    pattern = []
    for x in [x_dense] + [x_sparse] * 4:
        for a, b in zip(_grads(dense, x, gy), _grads(sparse, x, gy), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        pattern.append((calls[0], sparse.last_sparse))
    # Checked once, then 3 forwards dense without a check, then checked again: sparse.
    assert pattern == [(1, False), (1, False), (1, False), (1, False), (2, True)]
    sparse(x_dense)  # below the threshold again: dense, next 3 skip
    assert calls[0] == 3 and not sparse.last_sparse
    sparse(x_sparse[:3])  # another input size is routed afresh
    assert calls[0] == 4 and sparse.last_sparse
    sparse(x_dense)
    sparse.min_sparsity = 0.25  # a new threshold is applied at once
    sparse(x_sparse)
    assert calls[0] == 6 and sparse.last_sparse
    with pytest.raises(ValueError, match="check_every"):
        SparseInputLinear(4, 4, check_every=0)
    with pytest.raises(ValueError, match="min_sparsity"):
        sparse.min_sparsity = -0.1


def test_default_model_runs_sparse_on_a_large_layer_and_equals_nn_linear(monkeypatch):
    calls = _count_checks(monkeypatch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the model's threshold: 0.64
    torch.manual_seed(0)
    dense = nn.Linear(1024, 512).double()
    sparse = SparseInputLinear.from_linear(dense)  # input_grad="full": equal input gradient
    gy = torch.randn(256, 512, dtype=torch.float64)
    for s, expect_sparse in ((0.9, True), (0.0, False)):
        x = sparse_input(256, 1024, s, dtype=torch.float64)
        for a, b in zip(_grads(dense, x, gy), _grads(sparse, x, gy), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
        assert sparse.last_sparse is expect_sparse
        assert sparse.last_feature_sparsity == pytest.approx(s, abs=1e-3)
    assert calls[0] == 2


def test_predicted_break_even_shape_threads_device():
    def th(batch, in_f, out_f, **kw):
        return predicted_break_even(batch=batch, in_features=in_f, out_features=out_f, **kw)

    # The layer: below the 50% target in both modes, at 1 and 2 threads.
    for mode in ("active", "full"):
        for threads in (1, 2):
            assert th(512, 2048, 2048, input_grad=mode, threads=threads) <= 0.5
    # Never on small layers or few output features (the MNIST CNN's linear layers).
    assert th(32, 128, 10) == th(32, 3136, 128) == th(512, 2048, 10) == 1.0
    # Larger batches lower it, more threads raise it, "active" (3 shrinking products) is
    # below "full" (2), inference (1 product) is above training.
    assert th(512, 1024, 1024) < th(128, 1024, 1024)
    assert th(256, 1024, 1024, threads=1) < th(256, 1024, 1024, threads=4)
    assert th(512, 1024, 1024, input_grad="active") < th(512, 1024, 1024, input_grad="full")
    assert th(512, 1024, 1024) < th(512, 1024, 1024, input_requires_grad=False,
                                    weight_requires_grad=False)
    # Never below the measured floor; 1.0 on CUDA (no per-forward host sync) and for
    # half-precision CPU products (not measured).
    assert th(8192, 8192, 8192, input_grad="active") == DEFAULT_MIN_SPARSITY["active"]
    assert th(512, 2048, 2048, device_type="cuda") == 1.0
    assert th(512, 2048, 2048, dtype=torch.bfloat16) == 1.0


def test_cuda_input_with_default_threshold_is_dense_without_a_check(monkeypatch):
    """On a non-CPU device the model answers 1.0 before any tensor op (no host sync); the
    device type is faked here so that the test runs without a GPU."""
    calls = _count_checks(monkeypatch)
    import dgc.activation.sparse_linear as sl

    seen = []
    real = sl.predicted_break_even

    def as_cuda(**kw):
        seen.append(kw["device_type"])
        return real(**{**kw, "device_type": "cuda"})

    monkeypatch.setattr(sl, "predicted_break_even", as_cuda)
    layer = SparseInputLinear(2048, 2048)
    layer(sparse_input(512, 2048, 0.9))
    assert seen == ["cpu"] and calls[0] == 0 and not layer.last_sparse


def test_state_survives_deepcopy_and_pickle():
    import copy
    import pickle

    layer = SparseInputLinear(8, 4, min_sparsity=0.0, input_grad="active", check_every=3)
    x = torch.zeros(5, 8)
    x[:, 0] = 1.0
    layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.last_sparse and clone.check_every == 3 and clone.min_sparsity == 0.0
        torch.testing.assert_close(clone(x), layer(x))


@pytest.mark.parametrize("producer", ["relu_two_consumers", "relu6", "relu_maxpool", "topk_batch"])
def test_active_mode_upstream_gradient_exact(producer):
    """input_grad="active" drops x.grad on inactive features; the gradient upstream of a
    producer whose zeros are locally constant is still nn.Linear's (module docstring)."""
    from dgc.activation import TopKActivation

    torch.manual_seed(1)
    z0 = torch.randn(32, 48, dtype=torch.float64)
    z0[:, ::3] = -z0[:, ::3].abs() - 0.1  # dead after ReLU for the whole batch
    z0[:, :12] = -1.0  # and whole max-pooling windows
    in_f = 24 if producer == "relu_maxpool" else 48
    dense, sparse = _pair(in_f, 8, min_sparsity=0.0, input_grad="active")
    gy = torch.randn(32, 8, dtype=torch.float64)
    grads = []
    for layer in (dense, sparse):
        z = z0.clone().requires_grad_()
        if producer == "relu6":
            x = nn.functional.relu6(z)
        elif producer == "relu_maxpool":
            x = nn.functional.max_pool1d(torch.relu(z).unsqueeze(1), 2).squeeze(1)
        elif producer == "topk_batch":
            x = TopKActivation(12, per="batch", relu=True)(z)
        else:
            x = torch.relu(z)
        loss = (layer(x) * gy).sum()
        if producer == "relu_two_consumers":
            loss = loss + (x * torch.linspace(-1, 1, 48, dtype=torch.float64)).sum()
        loss.backward()
        grads.append((z.grad, layer.weight.grad, layer.bias.grad))
    assert sparse.last_sparse
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
