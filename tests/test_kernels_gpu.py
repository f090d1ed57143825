"""The CuPy kernels against their torch twins on a GPU, from 1 element to 100M; and the DDP hook on NCCL.

Skipped without CUDA and CuPy.  Run with ``pytest -m gpu``.  The twin runs on the same GPU (torch ops on
CUDA tensors), so both see the same data; the kernels must give the exact top-k set (compared as
magnitudes, and as index sets up to entries tied with the k-th magnitude) and the same state updates to
float tolerance (the fused kernel may round an fma differently from torch's separate operations).
"""

from __future__ import annotations

import math
import os
import tempfile

import dgc.kernels
import pytest
import torch
from dgc.kernels import reference

import dgc

_why = (
    "no CUDA device"
    if not torch.cuda.is_available()
    else None
    if dgc.kernels.cupy_available()
    else "CuPy is not installed or cannot see the GPU"
)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=str(_why)), pytest.mark.timeout(600)]

SIZES = [1, 63, 64, 65, 1000, 2**20 + 3, 25_000_000, 100_000_000]
WIRE = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def cb():
    from dgc.kernels import cupy_backend

    return cupy_backend


def _k(n: int, density: float = 0.001) -> int:
    return min(n, max(1, math.ceil(density * n)))


def assert_same_topk(mag: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int, rel: float = 0.0) -> None:
    """``a`` and ``b`` (int64 ascending) are both top-k sets of ``mag`` (|values|): equal magnitude
    multisets, and any index in only one of them has a magnitude within ``rel`` of the k-th largest."""
    assert a.numel() == b.numel() == k
    if k == 0:
        return
    assert torch.all(a[1:] > a[:-1]) and torch.all(b[1:] > b[:-1])
    kth = torch.topk(mag, k, sorted=False).values.min()
    ma, mb = mag[a].sort().values, mag[b].sort().values
    if rel == 0.0:
        assert torch.equal(ma, mb)
        assert bool((ma[0] >= kth) if ma.numel() else True)
    diff = torch.cat((a[~torch.isin(a, b)], b[~torch.isin(b, a)]))
    if diff.numel():
        assert bool(torch.all((mag[diff] - kth).abs() <= rel * kth)), "index sets differ beyond ties"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("sample_ratio", [0.01, 1.0])
def test_select_topk_kernel_equals_twin(cb, n, sample_ratio):
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, device="cuda", generator=gen)
    for k in sorted({1, _k(n), _k(n, 0.02), n}):
        if n > 2**21 and k == n:
            continue  # a full sort of 100M adds nothing here
        got = cb.select_topk(x, k, sample_ratio=sample_ratio, offset=n % 97)
        want = reference.select_topk(x, k, sample_ratio=sample_ratio, offset=n % 97)
        assert_same_topk(x.abs(), got, want, k)


@pytest.mark.parametrize("n", [1, 63, 1000, 2**20 + 3, 16_000_001])
@pytest.mark.parametrize("sample_ratio", [0.01, 1.0])
def test_select_topk_index_set_is_literally_torch_topk_without_ties(cb, n, sample_ratio):
    """Distinct magnitudes (a permutation of 1..n, exact in float32 up to 2**24): no ties, so the index
    set must be exactly torch.topk's, whatever path (sample, retries, block threshold) found it."""
    gen = torch.Generator(device="cuda").manual_seed(n)
    mag = torch.randperm(n, device="cuda", generator=gen).add_(1).float()
    sign = torch.where(torch.rand(n, device="cuda", generator=gen) < 0.5, -1.0, 1.0)
    x = mag * sign
    for k in sorted({1, _k(n), _k(n, 0.05), n if n < 2**21 else 1}):
        got = cb.select_topk(x, k, sample_ratio=sample_ratio, offset=n % 89)
        assert torch.equal(got, torch.topk(mag, k).indices.sort().values)


@pytest.mark.parametrize("dtype", WIRE)
@pytest.mark.parametrize("n", [65, 1000, 2**20 + 3, 25_000_000, 100_000_000])
def test_select_topk_dtypes_and_masks(cb, dtype, n):
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(n, device="cuda", generator=gen).to(dtype)
    mask = torch.rand(n, device="cuda", generator=gen) < 0.5
    k = _k(int(mask.sum()), 0.01)
    got = cb.select_topk(x, k, mask=mask, offset=3)
    want = reference.select_topk(x, k, mask=mask, offset=3)
    assert bool(mask[got].all())
    mag = torch.where(mask, x.float().abs(), -1.0)
    assert_same_topk(mag, got, want, k)
    assert torch.equal(cb.block_absmax(x, mask), reference.block_absmax(x, mask))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("wire", WIRE)
def test_compress_step_kernel_equals_twin(cb, n, wire):
    gen = torch.Generator(device="cuda").manual_seed(n + 1)
    nesterov = n % 2 == 1
    masked = n in (65, 2**20 + 3)
    grad_dtype = torch.float16 if n == 1000 else torch.float32
    u0, v0 = torch.randn(n, device="cuda", generator=gen), torch.randn(n, device="cuda", generator=gen)
    mask = (torch.rand(n, device="cuda", generator=gen) < 0.7) if masked else None
    if mask is not None:
        u0.mul_(mask)
        v0.mul_(mask)
    live = n if mask is None else int(mask.sum())
    k = _k(live)
    results = []
    for module in (cb, reference):
        u, v = u0.clone(), v0.clone()
        out_i = torch.empty(k, dtype=torch.int32, device="cuda")
        out_v = torch.empty(k, dtype=wire, device="cuda")
        g = torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5)).to(grad_dtype)
        idx = module.compress_step(
            g, u, v, beta=0.9, nesterov=nesterov, k=k, sample_ratio=0.01, offset=11,
            momentum_masking=True, out_indices=out_i, out_values=out_v, mask=mask,
        )  # fmt: skip
        v_pre = v.clone()
        v_pre[idx] += out_v.float()
        results.append((idx, u, v, v_pre, out_i, out_v))
    (ki, ku, kv, kpre, kout_i, kout_v), (ti, tu, tv, tpre, _, _) = results
    torch.testing.assert_close(kpre, tpre, rtol=2e-6, atol=2e-6)
    assert torch.equal(kout_i.long(), ki)
    # The kernel's selection is exact for the v it computed; the twin's agrees up to near-ties.
    mag = kpre.abs() if mask is None else torch.where(mask, kpre.abs(), -1.0)
    assert torch.equal(mag[ki].sort().values, torch.topk(mag, k).values.sort().values)
    assert_same_topk(mag, ki, ti, k, rel=1e-5)
    # What was sent is v rounded to the wire dtype; the rounding error stayed in v.
    assert torch.equal(kout_v, kpre[ki].to(wire))
    eps = torch.finfo(wire).eps if wire != torch.float32 else 0.0
    assert bool(torch.all(kv[ki].abs() <= eps * kpre[ki].abs() + 2.0**-24))  # + half's subnormal step
    common = torch.ones(n, dtype=torch.bool, device="cuda")
    common[ki] = False
    common[ti] = False
    torch.testing.assert_close(kv[common], tv[common], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ku[common], tu[common], rtol=2e-6, atol=2e-6)
    assert not ku[ki].any()  # momentum factor masking


@pytest.mark.parametrize("n", [1, 1000, 2**20 + 3, 25_000_000, 100_000_000])
@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("wire", WIRE)
def test_scatter_unpack_kernel_equals_twin_bitwise(cb, n, world, wire):
    gen = torch.Generator(device="cuda").manual_seed(world)
    k = _k(n, 0.01)
    idx = torch.stack([torch.randperm(n, device="cuda", generator=gen)[:k] for _ in range(world)]).int()
    val = torch.randn(world, k, device="cuda", generator=gen).to(wire)
    for out_dtype in (torch.float32, torch.float16):
        a = cb.scatter_unpack(torch.full((n,), 3.0, device="cuda", dtype=out_dtype), idx, val, world)
        b = reference.scatter_unpack(torch.full((n,), 3.0, device="cuda", dtype=out_dtype), idx, val, world)
        assert torch.equal(a, b)


def test_kernels_follow_the_current_stream(cb):
    """Work queued on a side stream is ordered with the kernels launched while it is current."""
    n = 25_000_000
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.randn(n, device="cuda")
        x.mul_(3.0)  # still running on `side` when the kernel is queued behind it
        idx = cb.select_topk(x, 1000, offset=1)
        want = reference.select_topk(x, 1000, offset=1)
    side.synchronize()
    assert_same_topk(x.abs(), idx, want, 1000)


def test_topk_select_dispatches_to_the_kernels_and_can_be_forced(cb, monkeypatch):
    """dgc.topk_select on a CUDA tensor runs the CuPy kernel (auto), or the twin when forced."""
    calls = []
    for module in (cb, reference):
        real = module.select_topk
        monkeypatch.setattr(module, "select_topk", lambda *a, _r=real, _m=module, **kw: calls.append(_m) or _r(*a, **kw))
    x = torch.randn(100_000, device="cuda")
    for backend, want in (("auto", cb), ("cupy", cb), ("torch", reference)):
        calls.clear()
        idx, values = dgc.topk_select(x, 100, backend=backend)
        assert calls == [want], backend
        assert idx.device.type == "cuda" and values.numel() == 100
        assert torch.equal(values.abs().sort().values, torch.topk(x.abs(), 100).values.sort().values)
    with pytest.raises(RuntimeError, match="backend='cupy' needs CUDA tensors"):
        dgc.topk_select(x.cpu(), 100, backend="cupy")


def _ddp_run(
    backend: str, steps: int = 4, value_dtype: str = "float32", index_format: str = "auto"
) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).cuda()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    cfg = dgc.DGCConfig(
        density=0.01, dense_steps=1, min_compress_numel=64, backend=backend, value_dtype=value_dtype,
        index_format=index_format,
    )  # fmt: skip
    state = dgc.register(ddp, opt, cfg)
    data = torch.randn(steps, 32, 64, device="cuda")
    target = torch.randint(0, 10, (steps, 32), device="cuda")
    for i in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(data[i]), target[i]).backward()
        opt.step()
    assert state.stats.sparse_buckets > 0
    kernels = state.kernels_for(next(iter(state.memory.values())).residual)
    assert kernels.__name__.endswith("cupy_backend" if backend == "cupy" else "reference")
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("value_dtype", "index_format"),
    [("float32", "auto"), ("float32", "int32"), ("float16", "block16"), ("bfloat16", "block16")],
)
def test_ddp_hook_on_nccl_world_size_1(value_dtype, index_format):
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        try:
            with_kernels = _ddp_run("cupy", value_dtype=value_dtype, index_format=index_format)
            with_twins = _ddp_run("torch", value_dtype=value_dtype, index_format=index_format)
        finally:
            dist.destroy_process_group()
    for name, p in with_kernels.items():
        torch.testing.assert_close(p, with_twins[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
