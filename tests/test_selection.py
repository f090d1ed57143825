"""dgc.topk_select: exactly k entries, the exact top-k set, whatever the sample."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dgc


def _check_topk(x: torch.Tensor, k: int, idx: torch.Tensor, val: torch.Tensor) -> None:
    assert idx.dtype == torch.int64 and idx.numel() == k
    assert torch.unique(idx).numel() == k
    assert torch.equal(val, x.reshape(-1)[idx])
    if k:
        # Same multiset of magnitudes as torch.topk (robust to ties).
        want = torch.topk(x.reshape(-1).abs(), k).values.sort().values
        assert torch.equal(val.abs().sort().values, want)
        assert torch.all(idx[1:] > idx[:-1])  # ascending


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 50_000),
    frac=st.floats(0.0, 1.0),
    ratio=st.sampled_from([0.001, 0.01, 0.1, 1.0]),
    offset=st.integers(0, 10_000),
    seed=st.integers(0, 2**16),
)
def test_topk_select_is_exact(n, frac, ratio, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 3
    k = round(frac * n)
    idx, val = dgc.topk_select(x, k, ratio, offset=offset)
    _check_topk(x, k, idx, val)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_and_shapes(dtype):
    x = torch.randn(37, 53).to(dtype)
    idx, val = dgc.topk_select(x, 20)
    assert val.dtype == dtype
    _check_topk(x, 20, idx, val)


def test_heavy_ties_and_zeros():
    x = torch.zeros(10_000)
    x[::7] = 1.0
    x[::13] = -1.0
    idx, val = dgc.topk_select(x, 500, 0.01)
    assert idx.numel() == 500 and torch.all(val.abs() == 1.0)
    idx, val = dgc.topk_select(torch.zeros(1000), 10)
    assert idx.numel() == 10


def test_sample_that_overestimates_threshold_still_gives_k():
    # Most mass in one region the strided sample misses: the threshold must be lowered (docs/algorithm.md#selection).
    x = torch.full((100_000,), 1e-3)
    x[1::100] = 5.0  # every sampled position (offset 0, stride 100) is small...
    x[0::100] = 10.0  # ...except these
    idx, val = dgc.topk_select(x, 2000, 0.01, offset=0)
    _check_topk(x, 2000, idx, val)


@pytest.mark.parametrize(
    ("kwargs", "err"),
    [
        (dict(k=-1), ValueError),
        (dict(k=11), ValueError),
        (dict(k=2, sample_ratio=0.0), ValueError),
        (dict(k=2, sample_ratio=1.5), ValueError),
    ],
)
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        dgc.topk_select(torch.randn(10), **kwargs)
    with pytest.raises(TypeError):
        dgc.topk_select(torch.arange(10), 2)
