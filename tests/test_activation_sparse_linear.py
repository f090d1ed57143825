"""SparseInputLinear gives nn.Linear's results, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dgc.activation import SparseInputLinear, convert_to_sparse_input, sparse_input_linear
from dgc.activation.break_even import measure_break_even, sparse_input


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
