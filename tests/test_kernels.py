"""The kernel functions (select_topk, compress_step, scatter_unpack, block maxima) against naive references.

Every semantic test runs against three implementations of the same functions:

* ``torch``: the torch twins (``dgc.kernels.reference``);
* ``fused``: the compiled CPU path (``dgc.kernels.cpu_fused``, what ``backend="auto"`` runs on a CPU;
  skipped where no C++ compiler builds it);
* ``emulated``: the real ``kernels/cupy_backend.py`` with the real CUDA C, run on the CPU by the
  emulator of ``test_kernels_emulator.py`` (small sizes: every CUDA thread is an OS thread);
* ``cupy``: the CuPy kernels on a GPU (``@pytest.mark.gpu``, skipped without CUDA and CuPy).

The naive references are written here, independently of the code under test.  Selections are compared as
multisets of magnitudes (robust to ties) plus the structural guarantees (exactly k, unique, ascending,
int64, never a masked entry); the state updates are compared bit for bit, with dyadic data for which
every float32 operation is exact, so the order of operations (or an FMA) cannot matter.
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass
from types import ModuleType

import dgc.kernels
import numpy as np
import pytest
import torch
from dgc.kernels import reference
from hypothesis import given, settings
from hypothesis import strategies as st

WIRE = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------- implementations
@dataclass(frozen=True)
class Impl:
    name: str
    module: ModuleType
    device: torch.device
    max_n: int
    """Largest tensor the tests give it (the emulator is slow)."""


def _cupy_ready() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not dgc.kernels.cupy_available():
        return "CuPy is not installed or cannot see the GPU"
    return None


gpu = [pytest.mark.gpu, pytest.mark.skipif(_cupy_ready() is not None, reason=str(_cupy_ready()))]


@pytest.fixture(scope="module")
def emulated() -> Impl:
    from test_kernels_emulator import available, emulated_backend

    why = available()
    if why:
        pytest.skip(why)
    module, _ = emulated_backend()
    return Impl("emulated", module, torch.device("cpu"), 1_000)


@pytest.fixture(params=["torch", "fused", "emulated", pytest.param("cupy", marks=gpu)])
def impl(request) -> Impl:
    if request.param == "torch":
        return Impl("torch", reference, torch.device("cpu"), 300_000)
    if request.param == "fused":
        from dgc.kernels import cpu_fused

        if not cpu_fused.is_available():
            pytest.skip("the compiled CPU kernels are unavailable (no C++ compiler?)")
        return Impl("fused", cpu_fused, torch.device("cpu"), 300_000)
    if request.param == "emulated":
        return request.getfixturevalue("emulated")
    from dgc.kernels import cupy_backend

    return Impl("cupy", cupy_backend, torch.device("cuda"), 10_000_000)


# --------------------------------------------------------------------------------------- naive references
def naive_topk_magnitudes(x: torch.Tensor, k: int, mask: torch.Tensor | None) -> torch.Tensor:
    a = x.reshape(-1).double().abs()
    if mask is not None:
        a = a[mask.reshape(-1)]
    return torch.sort(a, descending=True).values[:k]


def check_topk(x: torch.Tensor, k: int, idx: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """idx is an exact top-k of |x| over the live entries: compared as a multiset of magnitudes."""
    x = x.reshape(-1)
    assert idx.dtype == torch.int64 and idx.dim() == 1 and idx.numel() == k
    idx = idx.cpu()
    if k:
        assert torch.all(idx[1:] > idx[:-1]), "indices must be unique and ascending"
        assert 0 <= int(idx[0]) and int(idx[-1]) < x.numel()
        if mask is not None:
            assert bool(mask.reshape(-1).cpu()[idx].all()), "a masked entry was selected"
    got = torch.sort(x.cpu().double().abs()[idx], descending=True).values
    want = naive_topk_magnitudes(x.cpu(), k, None if mask is None else mask.cpu())
    assert torch.equal(got, want), "not the top-k magnitudes"


def dyadic(n: int, gen: torch.Generator, scale: int = 2**20) -> torch.Tensor:
    """Integers in [-scale, scale] times 2**-10: sums and halvings of a few of them are exact in float32."""
    return torch.randint(-scale, scale + 1, (n,), generator=gen).float() * 2.0**-10


def naive_update(g, u, v, mask, beta, nesterov):
    """Steps 1-2 in float64 (exact for dyadic data), then rounded to float32."""
    g = g.double() * (1.0 if mask is None else mask.double())
    v = v.double()
    if u is None:
        return None, (v + g).float()
    u = u.double()
    if nesterov:
        u = (u + g) * beta
        v = v + u + g
    else:
        u = beta * u + g
        v = v + u
    return u.float(), v.float()


# ---------------------------------------------------------------------------------------------- selection
SIZES = [1, 2, 31, 63, 64, 65, 127, 129, 1000, 4097]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("sample_ratio", [0.01, 0.3, 1.0])
def test_select_topk_exact(impl, n, sample_ratio):
    if n > impl.max_n:
        pytest.skip(f"{impl.name} is tested up to n = {impl.max_n} here")
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 3).to(impl.device)
    ks = {0, 1, max(1, n // 64), n // 2, n}
    if impl.name != "emulated":  # every thread of the emulator is an OS thread: fewer cases there
        ks |= {max(1, n // 1000), n - 1}
    for k in sorted(ks - {-1}):
        for offset in (0, n + 5) if impl.name == "emulated" else (0, 7, n + 5):
            idx = impl.module.select_topk(x, k, sample_ratio=sample_ratio, offset=offset)
            check_topk(x, k, idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_select_topk_dtypes(impl, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3001, generator=gen).to(dtype).to(impl.device)
    for k in (1, 30, 100, 3001):
        check_topk(x, k, impl.module.select_topk(x, k, sample_ratio=0.01, offset=3))


@pytest.mark.parametrize("sample_ratio", [0.01, 1.0])
def test_select_topk_with_mask(impl, sample_ratio):
    gen = torch.Generator().manual_seed(2)
    n = 4099
    x = torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.3
    mask[64:192] = False  # two whole dead blocks
    x[~mask] *= 100.0  # dead entries are the largest: they must still never be chosen
    x, mask = x.to(impl.device), mask.to(impl.device)
    live = int(mask.sum())
    for k in (1, 5, 100, live // 2, live):
        idx = impl.module.select_topk(x, k, sample_ratio=sample_ratio, offset=1, mask=mask)
        check_topk(x, k, idx, mask)


def test_select_topk_ties_and_zeros(impl):
    n = 4096 + 17
    x = torch.zeros(n)
    x[::7] = 1.0
    x[::13] = -1.0
    x = x.to(impl.device)
    for k in (1, 100, 500, 1000, n):  # beyond the ~900 ones the zeros fill up
        check_topk(x, k, impl.module.select_topk(x, k, sample_ratio=0.01, offset=0))
    z = torch.zeros(1000, device=impl.device)
    check_topk(z, 10, impl.module.select_topk(z, 10, sample_ratio=0.01))


def test_select_topk_sample_misses_the_mass(impl):
    # The strided sample sees only the small entries at the start: the sampled threshold overshoots,
    # and the adaptation loop (x0.8, 10 times) or the exact fallback must still give exactly k.
    n = 100_000 if impl.name != "emulated" else 5_000
    x = torch.full((n,), 1e-3)
    x[n // 2 : n // 2 + 40] = torch.linspace(1.0, 2.0, 40)
    x = x.to(impl.device)
    for k in (10, 40, 41, 300):
        check_topk(x, k, impl.module.select_topk(x, k, sample_ratio=0.01, offset=0))


def test_select_topk_precomputed_block_max(impl):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2000, generator=gen).to(impl.device)
    mask = (torch.rand(2000, generator=gen) < 0.5).to(impl.device)
    bm = impl.module.block_absmax(x, mask)
    check_topk(x, 50, impl.module.select_topk(x, 50, block_max=bm, mask=mask), mask)


def test_select_topk_rejects_bad_k(impl):
    x = torch.randn(10, device=impl.device)
    with pytest.raises(ValueError, match="k"):
        impl.module.select_topk(x, 11)
    with pytest.raises(ValueError, match="k"):
        impl.module.select_topk(x, -1)
    mask = torch.zeros(10, dtype=torch.bool, device=impl.device)
    mask[:3] = True
    with pytest.raises(ValueError, match="unmasked"):
        impl.module.select_topk(x, 5, sample_ratio=1.0, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000])
def test_block_absmax(impl, dtype, n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen).to(dtype)
    mask = torch.rand(n, generator=gen) < 0.5
    for m in (None, mask):
        got = impl.module.block_absmax(x.to(impl.device), None if m is None else m.to(impl.device))
        a = x.double().abs()
        if m is not None:
            a[~m] = -1.0
        pad = torch.full((-n % reference.BLOCK,), -math.inf, dtype=torch.float64)
        want = torch.cat((a, pad)).view(-1, reference.BLOCK).amax(1)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(got.cpu().double(), want)


def test_block_absmax_propagates_nan(impl):
    """A NaN makes its block's maximum NaN (torch's amax; CUDA's fmaxf would drop it), so no block
    holding a NaN ever counts as reaching a threshold, in the twin and the kernels alike."""
    x = torch.randn(200)
    x[70] = float("nan")
    for t in (x, x.to(torch.bfloat16)):
        got = impl.module.block_absmax(t.to(impl.device)).cpu()
        assert torch.isnan(got).tolist() == [False, True, False, False]


def test_candidates_above(impl):
    gen = torch.Generator().manual_seed(4)
    n = 3000 + 5
    x = torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.7
    for m in (None, mask):
        md = None if m is None else m.to(impl.device)
        bm = impl.module.block_absmax(x.to(impl.device), md)
        for thr in (0.0, 0.5, 2.0, 3.0, 10.0):
            got = impl.module.candidates_above(x.to(impl.device), bm, thr, md)
            hit = x.abs() >= thr
            if m is not None:
                hit &= m
            assert torch.equal(got.cpu(), torch.nonzero(hit).squeeze(1))


# ------------------------------------------------------------------------------------------ compress_step
@dataclass
class Step:
    n: int
    k: int
    momentum: bool = True
    nesterov: bool = False
    masking: bool = True
    wire: torch.dtype = torch.float32
    grad: torch.dtype = torch.float32
    masked: bool = False
    sample_ratio: float = 0.01


STEPS = [
    Step(n=1, k=1),
    Step(n=64, k=1),
    Step(n=65, k=2, nesterov=True),
    Step(n=1000, k=1, momentum=False),
    Step(n=1000, k=10, masking=False, sample_ratio=1.0),
    Step(n=4097, k=5, wire=torch.float16),
    Step(n=4097, k=41, wire=torch.bfloat16, nesterov=True),
    Step(n=4097, k=100, grad=torch.float16, masked=True),
    Step(n=4097, k=300, grad=torch.bfloat16, wire=torch.float16, masked=True, nesterov=True),
    Step(n=3000, k=3000, momentum=False, masked=False, wire=torch.bfloat16),
    Step(n=3001, k=0),
    Step(n=2000, k=700, sample_ratio=1.0, masked=True),  # more picks than blocks: the full topk path
]


def _run_step(impl: Impl, s: Step, gen: torch.Generator, steps: int = 3):
    """Run ``steps`` compress steps; check each against the naive reference, bit for bit."""
    dev = impl.device
    u = dyadic(s.n, gen).to(dev) if s.momentum else None
    v = dyadic(s.n, gen).to(dev)
    mask = (torch.rand(s.n, generator=gen) < 0.6).to(dev) if s.masked else None
    if mask is not None:
        v.mul_(mask)
        if u is not None:
            u.mul_(mask)
    k = min(s.k, s.n if mask is None else int(mask.sum()))
    beta = 0.5
    for step in range(steps):
        g = dyadic(s.n, gen, scale=2**10).to(s.grad).to(dev)  # exact in float16/bfloat16 too
        want_u, want_v = naive_update(g.cpu(), None if u is None else u.cpu(), v.cpu(),
                                      None if mask is None else mask.cpu(), beta, s.nesterov)  # fmt: skip
        out_i = torch.full((k,), -7, dtype=torch.int32, device=dev)
        out_v = torch.full((k,), 7.0, dtype=s.wire, device=dev)
        idx = impl.module.compress_step(
            g, u, v, beta=beta, nesterov=s.nesterov, k=k, sample_ratio=s.sample_ratio, offset=step,
            momentum_masking=s.masking, out_indices=out_i, out_values=out_v, mask=mask,
        )  # fmt: skip
        check_topk(want_v, k, idx, mask)
        sel = idx.cpu()
        assert torch.equal(out_i.cpu(), sel.int())
        assert torch.equal(out_v.cpu(), want_v[sel].to(s.wire))
        # Step 5: the rounding error (0 in float32) stays in v; u of sent entries is zeroed.
        want_v[sel] = want_v[sel] - out_v.cpu().float()
        if u is not None and s.masking:
            want_u[sel] = 0.0
        assert torch.equal(v.cpu(), want_v)
        if u is not None:
            assert torch.equal(u.cpu(), want_u)
        if mask is not None:
            assert not v.cpu()[~mask.cpu()].any()


@pytest.mark.parametrize("s", STEPS, ids=lambda s: f"n{s.n}-k{s.k}-{s.wire}-{s.grad}".replace("torch.", ""))
def test_compress_step_matches_naive(impl, s):
    _run_step(impl, s, torch.Generator().manual_seed(s.n + s.k))


@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16])
def test_compress_step_saturates_the_wire(impl, wire):
    """Beyond the wire's range: the largest finite value is sent and the excess stays in v (twin and
    kernel alike); NaN would pass through (the hook refuses non-finite gradients before this)."""
    limit = torch.finfo(wire).max
    big = 1e5 if wire == torch.float16 else 3.4e38
    n, dev = 300, impl.device
    g = torch.zeros(n)
    g[5], g[200], g[299] = big, -big, 1.0
    v = torch.zeros(n, device=dev)
    out_i = torch.empty(3, dtype=torch.int32, device=dev)
    out_v = torch.empty(3, dtype=wire, device=dev)
    impl.module.compress_step(
        g.to(dev), None, v, beta=0.0, nesterov=False, k=3, sample_ratio=1.0, offset=0,
        momentum_masking=False, out_indices=out_i, out_values=out_v,
    )  # fmt: skip
    assert out_i.cpu().tolist() == [5, 200, 299]
    assert out_v.cpu().float().tolist() == [limit, -limit, 1.0]
    left = v.cpu()
    assert torch.isfinite(left).all()
    assert left[5].item() == torch.tensor(big).sub(limit).item() and left[200].item() == -left[5].item()
    assert left[299].item() == 0.0


@pytest.mark.parametrize("soft", [False, True], ids=["cvt", "soft_bf16"])
def test_emulated_bf16_cast_rounds_like_torch(soft):
    """The bfloat16 wire cast, bit for bit against torch on awkward float32s (ties, subnormals, the
    largest values, NaN): the PTX cvt path, and the integer path that devices below sm_80 compile."""
    from test_kernels_emulator import available, emulated_backend

    why = available()
    if why:
        pytest.skip(why)
    module, _ = emulated_backend(define=("DGC_SOFT_BF16",) if soft else ())
    gen = torch.Generator().manual_seed(11)
    bits = torch.randint(-(2**31), 2**31 - 1, (4000,), generator=gen, dtype=torch.int64).to(torch.int32)
    special = torch.tensor(
        [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1.0 + 2**-9, 1.0 + 3 * 2**-9, 1e-40, -1e-45, 3.38e38,
         3.3895314e38, -3.39e38, 3.4e38, float("nan")], dtype=torch.float32,
    )  # fmt: skip
    x = torch.cat((bits.view(torch.float32), special))
    x = x[torch.isfinite(x) | torch.isnan(x)]
    n = x.numel()
    v = x.clone()
    out_i = torch.empty(n, dtype=torch.int32)
    out_v = torch.empty(n, dtype=torch.bfloat16)
    args = (module._arr(torch.arange(n)), np.int64(n), module._arr(v), module._NULL, np.int32(0),
            module._arr(out_i), module._arr(out_v), np.int32(2))  # fmt: skip
    module._launch("dgc_pack", 0, n, module._THREADS, args)
    want = reference.saturate(x, torch.bfloat16).to(torch.bfloat16)
    got = out_v
    both_nan = torch.isnan(got) & torch.isnan(want)
    assert both_nan.sum() == torch.isnan(x).sum()
    assert torch.equal(got[~both_nan].view(torch.int16), want[~both_nan].view(torch.int16))


def test_compress_step_random_data_is_consistent(impl):
    """Inexact (Gaussian) data: u and v to float tolerance, the selection exact for the v computed."""
    gen = torch.Generator().manual_seed(5)
    n, k, beta = 4099, 40, 0.9
    u0, v0, g = (torch.randn(n, generator=gen) for _ in range(3))
    u, v = u0.clone().to(impl.device), v0.clone().to(impl.device)
    out_i = torch.empty(k, dtype=torch.int32, device=impl.device)
    out_v = torch.empty(k, dtype=torch.float16, device=impl.device)
    idx = impl.module.compress_step(
        g.to(impl.device), u, v, beta=beta, nesterov=False, k=k, sample_ratio=0.01, offset=3,
        momentum_masking=True, out_indices=out_i, out_values=out_v,
    )  # fmt: skip
    sel = idx.cpu()
    v_pre = v.cpu().clone()
    v_pre[sel] += out_v.cpu().float()  # what was accumulated before sending
    check_topk(v_pre, k, idx)
    want_u = beta * u0 + g
    torch.testing.assert_close(v_pre, v0 + want_u, rtol=1e-6, atol=1e-6)
    want_u[sel] = 0.0
    torch.testing.assert_close(u.cpu(), want_u, rtol=1e-6, atol=1e-6)


def test_compress_step_into_wire_buffer_views(impl):
    """The pairs land in dtype views of one byte buffer, as in the DDP hook's message."""
    gen = torch.Generator().manual_seed(6)
    n, k = 1000, 9
    raw = torch.zeros(4 + 4 * k + 2 * k + 2, dtype=torch.uint8, device=impl.device)
    out_i = raw[4 : 4 + 4 * k].view(torch.int32)
    out_v = raw[4 + 4 * k : 4 + 6 * k].view(torch.bfloat16)
    v = dyadic(n, gen).to(impl.device)
    want = v.clone()
    idx = impl.module.compress_step(
        torch.zeros(n, device=impl.device), None, v, beta=0.0, nesterov=False, k=k, sample_ratio=0.01,
        offset=0, momentum_masking=True, out_indices=out_i, out_values=out_v,
    )  # fmt: skip
    check_topk(want, k, idx)
    assert torch.equal(out_i.cpu().long(), idx.cpu())
    assert torch.equal(out_v.cpu(), want.cpu()[idx.cpu()].bfloat16())
    assert not raw[:4].any() and not raw[-2:].any()  # nothing written outside the views


def test_compress_step_into_strided_outputs(impl):
    """Non-contiguous outputs are filled too (through a temporary on the GPU path)."""
    gen = torch.Generator().manual_seed(8)
    n, k = 700, 6
    out_i = torch.zeros(2 * k, dtype=torch.int32, device=impl.device)[::2]
    out_v = torch.zeros(2 * k, dtype=torch.float16, device=impl.device)[::2]
    v = dyadic(n, gen).to(impl.device)
    want = v.clone()
    idx = impl.module.compress_step(
        torch.zeros(n, device=impl.device), None, v, beta=0.0, nesterov=False, k=k, sample_ratio=1.0,
        offset=0, momentum_masking=False, out_indices=out_i, out_values=out_v,
    )  # fmt: skip
    check_topk(want, k, idx)
    assert torch.equal(out_i.cpu().long(), idx.cpu())
    assert torch.equal(out_v.cpu(), want.cpu()[idx.cpu()].half())


# ----------------------------------------------------------------------------------------- scatter_unpack
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("wire", WIRE)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scatter_unpack_equals_dense_sum(impl, world_size, wire, out_dtype):
    gen = torch.Generator().manual_seed(world_size)
    n, k = 3001, 50
    rows = []
    for _ in range(world_size):
        row = torch.randperm(n - 1, generator=gen)[:k]
        row[row >= 17] += 1  # unique within a worker, and without 17 ...
        row[0] = 17  # ... until every worker sends position 17: the sums meet there
        rows.append(row)
    idx = torch.stack(rows)
    val = torch.randn(world_size, k, generator=gen).to(wire)
    want = torch.zeros(n, dtype=torch.float64)
    for r in range(world_size):
        want.index_add_(0, idx[r], val[r].double())
    want /= world_size
    for idx_dtype in (torch.int32, torch.int64):
        out = torch.full((n,), float("nan"), dtype=out_dtype, device=impl.device)
        res = impl.module.scatter_unpack(
            out, idx.to(idx_dtype).reshape(-1).to(impl.device), val.reshape(-1).to(impl.device), world_size
        )
        assert res is out
        torch.testing.assert_close(out.cpu().double(), want.to(out_dtype).double(), rtol=1e-6, atol=1e-7)
        # Rank order, float32: exactly the sequential float32 sum divided by N (on the same device,
        # whose division the implementation uses too).
        acc = torch.zeros(n, device=impl.device)
        for r in range(world_size):
            acc[idx[r].to(impl.device)] += val[r].float().to(impl.device)
        assert torch.equal(out, (acc / world_size if world_size > 1 else acc).to(out_dtype))


def test_scatter_unpack_bitwise_identical_across_calls(impl):
    gen = torch.Generator().manual_seed(9)
    n, k, world = 2000, 300, 4
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(world)]).to(impl.device)
    val = torch.randn(world, k, generator=gen).to(impl.device)
    a = impl.module.scatter_unpack(torch.empty(n, device=impl.device), idx, val, world)
    b = impl.module.scatter_unpack(torch.empty(n, device=impl.device), idx, val, world)
    assert torch.equal(a, b)


def test_scatter_unpack_no_pairs(impl):
    out = torch.ones(100, device=impl.device)
    empty = torch.empty(0, dtype=torch.int32, device=impl.device)
    impl.module.scatter_unpack(out, empty, torch.empty(0, device=impl.device), 2)
    assert not out.any()


# ------------------------------------------------------------------------- property-based (torch twins)
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 200_000),
    frac=st.floats(0.0, 1.0),
    small=st.booleans(),
    ratio=st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0]),
    offset=st.integers(0, 5_000),
    masked=st.booleans(),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_twin_select_topk_property(n, frac, small, ratio, offset, masked, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(-3, 4, (n,), generator=gen).float()
    else:
        x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 3
    mask = torch.rand(n, generator=gen) < 0.5 if masked else None
    live = n if mask is None else int(mask.sum())
    k = round(frac * live * (0.01 if small else 1.0))
    idx = reference.select_topk(x, k, sample_ratio=ratio, offset=offset, mask=mask)
    check_topk(x, k, idx, mask)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 5_000),
    frac=st.floats(0.0, 1.0),
    ratio=st.sampled_from([0.01, 0.1, 1.0]),
    offset=st.integers(0, 200),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_emulated_select_topk_property(emulated, n, frac, ratio, offset, masked, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 3
    mask = torch.rand(n, generator=gen) < 0.5 if masked else None
    live = n if mask is None else int(mask.sum())
    k = round(frac * live)
    idx = emulated.module.select_topk(x, k, sample_ratio=ratio, offset=offset, mask=mask)
    check_topk(x, k, idx, mask)
    assert torch.equal(idx, reference.select_topk(x, k, sample_ratio=ratio, offset=offset, mask=mask))


@pytest.mark.parametrize("masked", [False, True])
def test_twin_threads_change_nothing(masked):
    """The CPU passes split their chunks among threads: 1 or 2 threads give the same bits (2M elements
    at density 0.003 make every pooled stage, the gathering of ~6k candidate blocks included, use two
    ranges)."""
    gen = torch.Generator().manual_seed(10)
    n, k = 2_000_000 + 7, 6_001
    x = torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.9 if masked else None
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            u, v = torch.zeros(n), x.clone()
            out_i, out_v = torch.empty(k, dtype=torch.int32), torch.empty(k, dtype=torch.bfloat16)
            idx = reference.compress_step(
                x, u, v, beta=0.9, nesterov=False, k=k, sample_ratio=0.01, offset=t,
                momentum_masking=True, out_indices=out_i, out_values=out_v, mask=mask,
            )  # fmt: skip
            sel = reference.select_topk(x, k, offset=t, mask=mask)
            results.append((idx, u, v, out_i, out_v, sel, reference.block_absmax(x, mask)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    check_topk(x, k, results[0][5], mask)
    check_topk(x + x * (1.0 if mask is None else mask.float()), k, results[0][0], mask)


# ------------------------------------------------------------------------------------- module and dispatch
def test_cupy_backend_import_is_guarded(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    monkeypatch.delitem(sys.modules, "dgc.kernels.cupy_backend", raising=False)
    with pytest.raises(ImportError, match="CuPy"):
        importlib.import_module("dgc.kernels.cupy_backend")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_cupy_backend_without_gpu_is_unavailable():
    pytest.importorskip("cupy")
    from dgc.kernels import cupy_backend

    assert cupy_backend.is_available() is False
    assert dgc.kernels.cupy_available() is False
    cpu = dgc.kernels.backend_for(torch.device("cpu"))
    assert cpu.__name__ in ("dgc.kernels.cpu_fused", "dgc.kernels.reference")
    assert dgc.kernels.backend_for(torch.device("cpu"), "torch") is reference
    assert dgc.kernels.backend_for(torch.device("cuda")) is reference  # auto falls back
    with pytest.raises(RuntimeError, match="cupy"):
        dgc.kernels.backend_for(torch.device("cuda"), "cupy")


def test_kernel_source_inlines_the_header():
    pytest.importorskip("cupy")
    from dgc.kernels import cupy_backend

    src = cupy_backend.kernel_source()
    assert "#include" not in src  # NVRTC gets no include path
    assert src.count("#define DGC_COMMON_CUH") == 1
    for name in ("dgc_fused_update", "dgc_block_absmax", "dgc_count_above", "dgc_compact_above",
                 "dgc_pack", "dgc_scatter_add"):  # fmt: skip
        assert f'extern "C" __global__ void {name}(' in src
    assert f"#define DGC_BLOCK {reference.BLOCK}\n" in src
