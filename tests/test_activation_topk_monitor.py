"""TopKActivation keeps exactly k; the monitor counts zeros per layer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dgc.activation import ActivationMonitor, SparseInputLinear, TopKActivation, build_activation


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 16), features=st.integers(1, 64), k=st.integers(1, 64),
       seed=st.integers(0, 999))
def test_topk_per_sample_keeps_exactly_k_largest(batch, features, k, seed):
    x = torch.randn(batch, features, generator=torch.Generator().manual_seed(seed))
    y = TopKActivation(k)(x)
    kk = min(k, features)
    assert ((y != 0).sum(1) == kk).all()
    kept = y != 0
    for i in range(batch):  # kept values are unchanged and are the k largest
        assert torch.equal(y[i][kept[i]], x[i][kept[i]])
        if kk < features:
            assert x[i][~kept[i]].max() <= x[i][kept[i]].min()


def test_topk_fraction_4d_and_gradient():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    act = TopKActivation(0.1)
    y = act(x)
    assert act.k_for(75) == 8
    assert ((y != 0).reshape(4, -1).sum(1) == 8).all()
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float())  # gradient through kept entries only


def test_topk_per_batch_shares_features_and_relu():
    x = torch.randn(32, 20)
    x[:, 3] += 5.0
    y = TopKActivation(4, per="batch")(x)
    kept_features = (y != 0).any(0)
    assert int(kept_features.sum()) == 4 and kept_features[3]
    assert ((y != 0).sum(1) == 4).all()
    z = TopKActivation(10, relu=True)(-torch.rand(2, 20))
    assert (z == 0).all()
    with pytest.raises(ValueError, match="fraction"):
        TopKActivation(1.5)
    with pytest.raises(ValueError, match="count"):
        TopKActivation(0)
    with pytest.raises(ValueError, match="per"):
        TopKActivation(3, per="row")


def test_monitor_counts_zeros_and_batch_wide_features():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        model[0].weight[:4] = 0.0
        model[0].bias[:4] = -1.0  # 4 of 20 hidden units always dead
    mon = ActivationMonitor(model)
    xs = [torch.randn(8, 10) for _ in range(3)]
    for x in xs:
        model(x)
    hidden = torch.cat([torch.relu(model[0](x)) for x in xs])
    summary = mon.summary()
    assert summary["1"].sparsity == pytest.approx((hidden == 0).float().mean().item())
    assert summary["1"].batches == 3
    assert summary["2 (input)"].feature_sparsity == pytest.approx(
        sum((torch.relu(model[0](x)) == 0).all(0).sum().item() for x in xs) / 60)
    assert summary["2 (input)"].feature_sparsity >= 4 / 20
    model.eval()
    model(xs[0])  # eval passes are ignored by default
    assert mon.summary()["1"].batches == 3
    mon.reset()
    assert mon.summary() == {}
    mon.remove()
    model.train()
    model(xs[0])
    assert mon.summary() == {}


def test_monitor_every_n_and_validation():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = ActivationMonitor(model, every=3, measure_linear_inputs=False)
    for _ in range(7):
        model(torch.randn(2, 4))
    assert mon.summary()["1"].batches == 3  # passes 1, 4, 7
    with pytest.raises(ValueError, match="every"):
        ActivationMonitor(model, every=0)


def test_build_activation_topk_and_sparse_linear():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    mon = build_activation(model, topk=0.25, topk_per="batch", sparse_linear=True,
                           min_sparsity=0.5)
    assert isinstance(model[1], TopKActivation) and isinstance(model[2], SparseInputLinear)
    assert model[2].input_grad == "active"
    model(torch.randn(64, 16))
    assert model[2].last_sparse and model[2].last_feature_sparsity >= 0.75
    assert mon.summary()["2 (input)"].feature_sparsity >= 0.75


def test_topk_before_linear_only():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(2, 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4, 3), nn.ReLU())
    build_activation(model, topk=2, topk_before_linear_only=True)
    kinds = [type(m).__name__ for m in model]
    assert kinds[1] == "ReLU" and kinds[5] == "TopKActivation" and kinds[8] == "ReLU"
    build_activation(model, topk=2)
    assert all(not isinstance(m, nn.ReLU) for m in model)
