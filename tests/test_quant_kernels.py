"""The quantizers' compiled CPU pass (kernels/quant_fused.*) against the torch reference of dgc.quant:
the same codes, scales, decoded values and residuals, bit for bit, on awkward sizes and block widths,
with both roundings (the stochastic one shares its counter-based draws with the reference), bad
input, other dtypes, and the fallback without the compiled pass."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from dgc.kernels import quant_fused

from dgc.quant import QSGD, Int8Quantizer, TernGrad, quantize_with_feedback
from dgc.quant.blocks import draw_key, uniform

pytestmark = pytest.mark.skipif(not quant_fused.is_available(),
                                reason="no C++ compiler: the compiled quantizer pass is unavailable")

SIZES = (1, 7, 8, 9, 63, 64, 65, 513)
BIG = 2**16 + 1
CHUNKS = (None, 1, 3, 64, 500, 512)


def quantizers(stochastic: bool):
    for chunk in CHUNKS:
        yield Int8Quantizer(bits=8, chunk_size=chunk, stochastic=stochastic)
        yield TernGrad(chunk_size=chunk, stochastic=stochastic)
        yield QSGD(levels=7, chunk_size=chunk, stochastic=stochastic)
    for bits in (3, 5, 6, 7):
        yield Int8Quantizer(bits=bits, chunk_size=100, stochastic=stochastic)
    for levels in (1, 3, 15, 127):
        yield QSGD(levels=levels, chunk_size=100, stochastic=stochastic)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN, and the same sign of zero."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        nan = torch.isnan(a)
        if not torch.equal(nan, torch.isnan(b)):
            return False
        a, b = a[~nan], b[~nan]
        return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))
    return torch.equal(a, b)


def both(q, x, residual=None, seed=3):
    out = []
    for backend in ("torch", "auto"):
        out.append(quantize_with_feedback(q, x, residual, generator=torch.Generator().manual_seed(seed),
                                          backend=backend))
    return out


def assert_same(want, got, q):
    assert same_bits(want.encoded.codes, got.encoded.codes), q
    assert same_bits(want.encoded.scales, got.encoded.scales), q
    assert same_bits(want.sent, got.sent), q
    assert same_bits(want.encoded.to_bytes(), got.encoded.to_bytes()), q
    if want.residual is not None:
        assert same_bits(want.residual, got.residual), q


@pytest.mark.parametrize("stochastic", [False, True])
def test_bit_identical_to_the_reference_on_awkward_sizes(stochastic):
    gen = torch.Generator().manual_seed(0)
    for n in (*SIZES, BIG):
        x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4  # many tiny values
        x[:: max(1, n // 5)] = 0.0
        res = torch.randn(n, generator=gen) * 0.1
        for i, q in enumerate(quantizers(stochastic)):
            if n == BIG and i % 7:
                continue  # the big size for a few of them (the reference is slow)
            for r in (None, res):
                assert_same(*both(q, x, r), q)


def test_ties_round_half_to_even_like_torch():
    # r * q exactly k + 0.5 for int8 at 8 bits (scale 127: r * 127 = x)
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 63.5, -63.5] * 8)
    for q in (Int8Quantizer(chunk_size=None), QSGD(levels=127, chunk_size=None, stochastic=False)):
        want, got = both(q, x)
        assert_same(want, got, q)


def test_threads_and_block_widths_do_not_change_the_bits():
    """Big enough for several threads' ranges; widths that are not multiples of 8 cut codes
    mid-byte at block ends (each thread's range is whole blocks and whole bytes)."""
    x = torch.randn(140_007, generator=torch.Generator().manual_seed(1))
    res = torch.randn(x.numel(), generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        for q in (Int8Quantizer(bits=5, chunk_size=500), TernGrad(chunk_size=509, stochastic=True),
                  QSGD(levels=7, chunk_size=512, stochastic=False)):
            want, got = both(q, x, res)
            assert_same(want, got, q)
            torch.set_num_threads(1)
            one = quantize_with_feedback(q, x, res, generator=torch.Generator().manual_seed(3))
            torch.set_num_threads(threads)
            assert_same(got, one, q)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_blocks_propagate_alike_and_raise_alike(bad):
    x = torch.randn(1000)
    x[517] = bad
    for make in (Int8Quantizer, TernGrad, QSGD):
        q = make(chunk_size=100, nonfinite="propagate")
        want, got = both(q, x, torch.ones(1000))
        assert_same(want, got, q)
        assert torch.isnan(got.sent[500:600]).all() and torch.isfinite(got.sent[:500]).all()
        strict = make(chunk_size=100)
        for backend in ("torch", "auto"):
            with pytest.raises(FloatingPointError, match="non-finite"):
                strict.encode(x, backend=backend)


def test_all_zero_sends_zeros():
    for make in (Int8Quantizer, TernGrad, QSGD):
        want, got = both(make(chunk_size=64), torch.zeros(200), torch.zeros(200))
        assert_same(want, got, make)
        assert torch.equal(got.encoded.scales, torch.zeros(4)) and not got.sent.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_and_strided_input(dtype):
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(4)).to(dtype).t()  # strided
    for q in (Int8Quantizer(chunk_size=512), QSGD(chunk_size=100, stochastic=False)):
        want, got = both(q, x, torch.randn(x.numel()).to(dtype))
        assert_same(want, got, q)


def test_decode_either_way_and_into_out():
    x = torch.randn(10_001)
    for q in (Int8Quantizer(bits=6, chunk_size=512), TernGrad(chunk_size=512), QSGD(levels=3, chunk_size=77)):
        ref = q.encode(x, generator=torch.Generator().manual_seed(0), backend="torch")
        fast = q.encode(x, generator=torch.Generator().manual_seed(0))
        msg = ref.to_bytes()
        assert torch.equal(msg, fast.to_bytes())
        parsed = q.from_bytes(msg, x.numel())
        out = torch.full((x.numel(),), 7.0)
        assert same_bits(q.decode(parsed, backend="torch"), q.decode(parsed, out=out))
        assert same_bits(out, q.decode(ref, backend="torch"))


def test_encode_into_a_message_buffer_needs_no_copy():
    q = Int8Quantizer(chunk_size=512)
    x = torch.randn(5000)
    buf = torch.full((4 + q.nbytes(x.numel()),), 255, dtype=torch.uint8)
    enc = q.encode(x, out=buf[4:])
    assert enc.to_bytes(buf[4:]).data_ptr() == buf[4:].data_ptr() and buf[0] == 255
    assert torch.equal(buf[4:], q.encode(x, backend="torch").to_bytes())


def test_counter_draws_are_uniform_and_keyed():
    key = draw_key(torch.Generator().manual_seed(0))
    u = uniform(key, 200_000)
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = u.numel() / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60, chi2  # 19 degrees of freedom: p < 1e-5 beyond 50
    assert abs(float(u[1:] @ u[:-1]) / (u.numel() - 1) - 0.25) < 0.005  # neighbours uncorrelated
    assert torch.equal(u, uniform(key, 200_000))
    assert not torch.equal(u, uniform(draw_key(torch.Generator().manual_seed(1)), 200_000))


def test_stochastic_fast_path_is_unbiased():
    x = torch.tensor([0.9, -0.37, 0.21, 0.0, -1.0, 0.55, 0.013, -0.66])
    k = 20_000
    for q in (Int8Quantizer(bits=4, chunk_size=8, stochastic=True), TernGrad(chunk_size=8),
              QSGD(levels=2, chunk_size=8)):
        out = q.decode(q.encode(x.repeat(k), generator=torch.Generator().manual_seed(5)))
        mean = out.view(k, -1).double().mean(dim=0).float()
        level = q.block_scales(x.view(1, -1))[0] / q.levels
        assert torch.all((mean - x).abs() <= 5 * (level / 2) / k**0.5), q


def test_without_the_compiled_pass_the_reference_runs():
    code = ("import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
            "from dgc.kernels import quant_fused\n"
            "from dgc.quant import Int8Quantizer\n"
            "assert not quant_fused.is_available()\n"
            "q = Int8Quantizer(chunk_size=4)\n"
            "assert q.decode(q.encode(torch.ones(9))).tolist() == [1.0] * 9\n")
    env = {**os.environ, "DGC_CPU_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    notices = [line for line in done.stderr.splitlines() if "compiled quantizer kernels unavailable" in line]
    assert len(notices) == 1, done.stderr
