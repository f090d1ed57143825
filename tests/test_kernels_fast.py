"""The compiled CPU path (``dgc.kernels.cpu_fused``) and the torch twin against the plain oracle.

Three implementations of one DGC step: the oracle :func:`dgc.kernels.plain.dgc_step_reference`
(unfused, whole-tensor torch operations in the order of the algorithm), the fused torch twin
``reference.compress_step`` and the compiled ``cpu_fused.compress_step``.  All three must give the same
selected set (ties at the k-th magnitude go to the lowest index) and the same bits of u, v and the
packed pairs: every operation is the same IEEE operation in the same order, so no tolerance is needed.
With NaN in the data the oracle's "NaN sorts first" and the fused paths' "a block holding NaN is never
a candidate" differ (the hook fails such a step as a whole anyway); there the compiled path is checked
against the twin only, bit for bit, and nothing may be lost.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from dgc.kernels import cpu_fused, plain, reference

COMPILER = shutil.which(os.environ.get("CXX", "g++"))
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler: the twins serve, nothing to test")


def test_builds_and_passes_its_self_check_where_a_compiler_is():
    assert cpu_fused.is_available(), "a compiler is here, yet the compiled CPU kernels did not load"

AWKWARD = [1, 63, 64, 65, 2**16 + 1, 10**6 + 3]
GRAD_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits; NaN equals NaN (any payload)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan_a, nan_b = a.isnan(), b.isnan()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(nan_a, nan_b) and torch.equal(
        a.masked_fill(nan_a, 0).view(ints), b.masked_fill(nan_b, 0).view(ints)
    )


def run_steps(impl, grads, *, n, k, beta=0.9, nesterov=False, mask=None, wire=torch.float32,
              momentum=True, masking=True, ratio=0.01, seed: int | None = 0):  # fmt: skip
    """Several steps of one implementation from the same start (random u and v from ``seed``; zeros
    with ``seed=None``); returns every output of every step."""
    gen = torch.Generator().manual_seed(seed or 0)

    def make() -> torch.Tensor:
        return torch.zeros(n) if seed is None else torch.randn(n, generator=gen)

    u = make() if momentum else None
    v = make()
    if mask is not None:
        v *= mask
        if u is not None:
            u *= mask
    out = []
    for step, g in enumerate(grads):
        if impl is plain:
            sent = plain.dgc_step_reference(g, u, v, k=k, beta=beta, nesterov=nesterov,
                                            momentum_masking=masking, wire_dtype=wire, mask=mask)  # fmt: skip
            idx, oi, ov = sent.indices, sent.indices.int(), sent.values
        else:
            oi, ov = torch.empty(k, dtype=torch.int32), torch.empty(k, dtype=wire)
            idx = impl.compress_step(g, u, v, beta=beta, nesterov=nesterov, k=k, sample_ratio=ratio,
                                     offset=3 * step + 1, momentum_masking=masking, out_indices=oi,
                                     out_values=ov, mask=mask)  # fmt: skip
        out.append((idx, oi, ov, None if u is None else u.clone(), v.clone()))
    return out


def assert_same(a, b) -> None:
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        for name, p, q in zip(("indices", "out_indices", "out_values", "u", "v"), x, y, strict=True):
            if p is None and q is None:
                continue
            assert same_bits(p, q), f"step {step}: {name} differs"


def grads_for(n: int, dtype: torch.dtype, seed: int, steps: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dtype) for _ in range(steps)]


# ------------------------------------------------------------------------------------ oracle, all three
@pytest.mark.parametrize("n", AWKWARD)
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_three_agree_on_awkward_sizes(n, dtype):
    big = n > 10**5
    grads = grads_for(n, dtype, seed=n, steps=2 if big else 3)
    k = max(1, n // 1000)
    want = run_steps(plain, grads, n=n, k=k)
    assert_same(run_steps(reference, grads, n=n, k=k), want)
    assert_same(run_steps(cpu_fused, grads, n=n, k=k), want)


@pytest.mark.parametrize(
    "case",
    [
        dict(nesterov=True),
        dict(momentum=False),
        dict(masking=False),
        dict(wire=torch.float16),
        dict(wire=torch.bfloat16, nesterov=True),
        dict(masked=True),
        dict(masked=True, wire=torch.float16, nesterov=True),
        dict(ratio=1.0),
        dict(ratio=0.3, masked=True),
    ],
    ids=str,
)
@pytest.mark.parametrize("n", [65, 2**16 + 1])
def test_three_agree_on_every_option(case, n):
    case = dict(case)
    gen = torch.Generator().manual_seed(5)
    mask = None
    if case.pop("masked", False):
        mask = torch.rand(n, generator=gen) < 0.7
        mask[0] = True
    k = max(1, n // 200)
    grads = grads_for(n, torch.float32, seed=n + 1)
    want = run_steps(plain, grads, n=n, k=k, mask=mask, **case)
    assert_same(run_steps(reference, grads, n=n, k=k, mask=mask, **case), want)
    assert_same(run_steps(cpu_fused, grads, n=n, k=k, mask=mask, **case), want)


@pytest.mark.parametrize("n", [64, 65, 2**16 + 1])
def test_ties_go_to_the_lowest_index(n):
    """Magnitudes from a handful of values: the k-th largest is tied many times over."""
    gen = torch.Generator().manual_seed(7)
    grads = [(torch.randint(-3, 4, (n,), generator=gen) * 0.5).float() for _ in range(3)]
    k = max(1, n // 10)
    for beta in (0.0, 0.5):  # 0.5: every value stays dyadic, so ties persist through the steps
        want = run_steps(plain, grads, n=n, k=k, beta=beta, momentum=beta > 0, seed=None)
        assert_same(run_steps(reference, grads, n=n, k=k, beta=beta, momentum=beta > 0, seed=None), want)
        assert_same(run_steps(cpu_fused, grads, n=n, k=k, beta=beta, momentum=beta > 0, seed=None), want)


def test_all_zero():
    n, k = 2**16 + 1, 70
    grads = [torch.zeros(n)] * 2
    for impl in (reference, cpu_fused):
        got = run_steps(impl, grads, n=n, k=k, seed=None)
        for idx, *_ in got:  # all magnitudes tie at 0: the lowest k positions
            assert torch.equal(idx, torch.arange(k))
        assert_same(got, run_steps(plain, grads, n=n, k=k, seed=None))


@pytest.mark.parametrize("n", [65, 2**16 + 1, 10**6 + 3])
@pytest.mark.parametrize("bad", ["inf", "nan", "both"])
def test_non_finite_compiled_equals_twin(n, bad):
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(n, generator=gen)
    spots = torch.randint(0, n, (max(1, n // 5000),), generator=gen)
    if bad in ("inf", "both"):
        g[spots[::2]] = float("inf")
        g[spots[1::2]] = -float("inf")
    if bad in ("nan", "both"):
        g[spots[: max(1, len(spots) // 3)]] = float("nan")
    mask = torch.rand(n, generator=gen) < 0.8
    mask[spots[0]] = False  # inf * 0 = NaN where masked, as torch.mul
    for kw in (dict(), dict(mask=mask), dict(nesterov=True, wire=torch.float16)):
        k = max(1, n // 1000)
        grads = [g, torch.randn(n, generator=gen)]
        twin = run_steps(reference, grads, n=n, k=k, **kw)
        assert_same(run_steps(cpu_fused, grads, n=n, k=k, **kw), twin)
    if bad == "inf":  # with inf but no NaN the oracle's order is the same too
        assert_same(run_steps(cpu_fused, [g], n=n, k=k, seed=3), run_steps(plain, [g], n=n, k=k, seed=3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_and_huge_values(dtype):
    """Half gradients are widened exactly; values beyond the half wire saturate, the excess stays in v."""
    n = 10**6 + 3
    gen = torch.Generator().manual_seed(13)
    g = (torch.randn(n, generator=gen) * 100).to(dtype)
    g[::9973] = torch.finfo(dtype).max
    grads = [g, g]
    k = 1000
    want = run_steps(plain, grads, n=n, k=k, wire=torch.float16)
    assert_same(run_steps(cpu_fused, grads, n=n, k=k, wire=torch.float16), want)
    assert_same(run_steps(reference, grads, n=n, k=k, wire=torch.float16), want)


def test_steps_0_to_5_against_the_codec_pieces():
    """The oracle's step 0 (weight decay, clipping) equals ``compressor.preprocess``, and the rest the
    compiled ``compress_step``: the oracle is the whole algorithm of ``dgc.compressor``."""
    from dgc.compressor import preprocess
    from dgc.config import DGCConfig

    n, k = 10**4 + 7, 25
    gen = torch.Generator().manual_seed(17)
    config = DGCConfig(weight_decay=1e-2, clip_norm=0.5, density=k / n)
    param, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 10
    u, v = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    u2, v2 = u.clone(), v.clone()
    sent = plain.dgc_step_reference(grad, u, v, k=k, beta=0.9, param=param, weight_decay=1e-2,
                                    clip_norm=0.5, world_size=4)  # fmt: skip
    g = preprocess(grad.clone(), param, config, world_size=4)
    oi, ov = torch.empty(k, dtype=torch.int32), torch.empty(k)
    idx = cpu_fused.compress_step(g, u2, v2, beta=0.9, nesterov=False, k=k, sample_ratio=0.01, offset=0,
                                  momentum_masking=True, out_indices=oi, out_values=ov)  # fmt: skip
    assert torch.equal(idx, sent.indices) and same_bits(ov, sent.values)
    assert same_bits(u2, u) and same_bits(v2, v)


def test_nothing_is_lost():
    """sent + v = the sum of the momentum-corrected gradients, step after step (float32 wire)."""
    n, k = 2**16 + 1, 100
    gen = torch.Generator().manual_seed(19)
    u, v = torch.zeros(n), torch.zeros(n)
    total_u, sent = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for step in range(4):
        g = torch.randn(n, generator=gen)
        oi, ov = torch.empty(k, dtype=torch.int32), torch.empty(k)
        cpu_fused.compress_step(g, u, v, beta=0.0, nesterov=False, k=k, sample_ratio=0.01, offset=step,
                                momentum_masking=True, out_indices=oi, out_values=ov)  # fmt: skip
        total_u += g.double()
        sent.index_add_(0, oi.long(), ov.double())
    torch.testing.assert_close(sent + v.double(), total_u, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ bare selection
@pytest.mark.parametrize("n", AWKWARD)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_select_topk_and_block_absmax(n, dtype):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen).to(dtype)
    x[:: max(1, n // 7)] = 0.0
    mask = torch.rand(n, generator=gen) < 0.9
    mask[0] = True
    k = max(1, n // 500)
    for m in (None, mask):
        want = plain.topk_reference(x, k, m)
        for ratio in (0.01, 1.0):
            for impl in (reference, cpu_fused):
                got = impl.select_topk(x, k, sample_ratio=ratio, offset=5, mask=m)
                assert torch.equal(got, want), (impl.__name__, ratio)
        assert same_bits(cpu_fused.block_absmax(x, m), reference.block_absmax(x, m))
    bm = reference.block_absmax(x)
    assert torch.equal(cpu_fused.select_topk(x, k, block_max=bm), plain.topk_reference(x, k))


def test_select_topk_nan_inf_compiled_equals_twin():
    n = 10**5 + 3
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(n, generator=gen)
    x[::777] = float("nan")
    x[5::1001] = float("inf")
    for k in (10, 500, 5000):  # 5000 > the blocks left without NaN: the full top-k decides
        for ratio in (0.01, 1.0):
            got = cpu_fused.select_topk(x, k, sample_ratio=ratio, offset=1)
            assert torch.equal(got, reference.select_topk(x, k, sample_ratio=ratio, offset=1))
    assert same_bits(cpu_fused.block_absmax(x), reference.block_absmax(x))


def test_thread_count_changes_nothing():
    n, k = 10**6 + 3, 3000
    x = torch.randn(n, generator=torch.Generator().manual_seed(29))
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append(run_steps(cpu_fused, [x, x], n=n, k=k, mask=x > -1.5, wire=torch.bfloat16))
    finally:
        torch.set_num_threads(threads)
    assert_same(*results)


# ------------------------------------------------------------------------------------------ bad input
def test_strided_gradient_is_copied_and_strided_state_refused():
    n, k = 4096, 8
    gen = torch.Generator().manual_seed(31)
    wide = torch.randn(n, 2, generator=gen)
    g = wide[:, 0]  # strided
    oi, ov = torch.empty(k, dtype=torch.int32), torch.empty(k)
    kw = dict(beta=0.9, nesterov=False, k=k, sample_ratio=0.01, offset=0, momentum_masking=True,
              out_indices=oi, out_values=ov)  # fmt: skip
    u1, v1, u2, v2 = torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)
    assert torch.equal(cpu_fused.compress_step(g, u1, v1, **kw), reference.compress_step(g.contiguous(), u2, v2, **kw))
    assert same_bits(v1, v2) and same_bits(u1, u2)
    for impl in (cpu_fused, reference):
        with pytest.raises(ValueError, match="residual must be a contiguous"):
            impl.compress_step(g, torch.zeros(n), torch.zeros(n, 2)[:, 0], **kw)
    with pytest.raises(TypeError, match="residual must be float32"):
        cpu_fused.compress_step(g, torch.zeros(n), torch.zeros(n, dtype=torch.float64), **kw)
    with pytest.raises(TypeError, match="grad must be a float tensor"):
        cpu_fused.compress_step(torch.ones(n, dtype=torch.int32), torch.zeros(n), torch.zeros(n), **kw)
    with pytest.raises(ValueError, match="mask must be a CPU bool tensor"):
        cpu_fused.compress_step(g, torch.zeros(n), torch.zeros(n), mask=torch.ones(n), **kw)
    with pytest.raises(ValueError, match="k = 9"):
        cpu_fused.select_topk(torch.randn(8), 9)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})  # fmt: skip


FALLBACK = """
import logging, torch
logging.basicConfig(level=logging.INFO)
import dgc.kernels as K
from dgc.kernels import reference, cpu_fused
assert K.backend_for(torch.device('cpu')) is reference
assert not cpu_fused.is_available()
x = torch.randn(1000)
assert torch.equal(cpu_fused.select_topk(x, 5), reference.select_topk(x, 5))
print('fallback ok')
"""


@pytest.mark.parametrize("env", [{"DGC_CPU_KERNELS": "0"}, {"CXX": "/nonexistent/g++"}], ids=["off", "no-compiler"])
def test_fallback_to_the_twins_with_one_log_line(env, tmp_path):
    done = _python(FALLBACK, DGC_KERNEL_CACHE=str(tmp_path), **env)
    assert done.returncode == 0, done.stderr
    assert "fallback ok" in done.stdout
    notices = [line for line in done.stderr.splitlines() if "compiled CPU kernels unavailable" in line]
    assert len(notices) == 1, done.stderr


def test_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DGC_KERNEL_CACHE", str(tmp_path))
    path = cpu_fused.build()
    stamp = path.stat().st_mtime_ns
    assert cpu_fused.build() == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_backend_for_picks_the_compiled_path(caplog):
    import dgc.kernels as K

    with caplog.at_level(logging.WARNING):
        assert K.backend_for(torch.device("cpu")) is cpu_fused
        assert K.backend_for(torch.device("cpu"), "torch") is reference
    assert not caplog.records


# ------------------------------------------------------------------------- the dense path (issue 13)
def dense_inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """g and u with NaN, +-inf and signed zeros in g, and inf/NaN in u (a non-finite step's leftovers)."""
    gen = torch.Generator().manual_seed(seed)
    g, u = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 3
    g[::97] = float("nan")
    g[5::101] = float("inf")
    g[7::103] = float("-inf")
    g[11::107] = -0.0
    u[13::109] = float("inf")
    u[17::113] = float("nan")
    u[11::107 * 3] = 0.0
    return g, u


def dense_run(impl, g: torch.Tensor, u: torch.Tensor, momentum: float, divide: float) -> tuple[torch.Tensor, ...]:
    g, u = g.clone(), u.clone()
    assert impl.dense_momentum(g, u, momentum, divide) is None
    return g, u


@pytest.mark.parametrize("n", [0, 1, 7, 10**6 + 3])
@pytest.mark.parametrize("divide", [1, 3, 4])
@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_dense_momentum_compiled_equals_twin(n, divide, momentum):
    g, u = dense_inputs(n, seed=n + divide)
    want = dense_run(reference, g, u, momentum, divide)
    if n > 1:  # the twin is the torch lines it stands for (ordinary values: division, not a reciprocal)
        assert same_bits(want[1], torch.add(g, u, alpha=momentum))
        assert same_bits(want[0], want[1] / divide)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            got = dense_run(cpu_fused, g, u, momentum, divide)
            assert same_bits(got[0], want[0]), f"g differs ({t} threads)"
            assert same_bits(got[1], want[1]), f"u differs ({t} threads)"
    finally:
        torch.set_num_threads(threads)


def test_dense_momentum_data_tells_the_shortcuts_apart():
    """On this data a multiply by 1/divide, or the other rounding of the momentum step (multiply-then-add
    where torch uses an fma, or the reverse), gives other bits: the equality tests above would catch them."""
    g, u = (t.nan_to_num(0.0, 0.0, 0.0) for t in dense_inputs(10**5 + 1, seed=3))
    got_g, got_u = dense_run(cpu_fused, g, u, 0.9, 3)
    assert not same_bits(got_g, got_u * (1 / 3))
    mul_add = g + u * 0.9
    fma = (g.double() + u.double() * torch.tensor(0.9).double()).float()  # exact product, one rounding
    # (a double-rounded stand-in for the fma: differs from it on a handful of ties at most)
    other = mul_add if cpu_fused._library().momentum_mode == cpu_fused._MOMENTUM_FMA else fma
    assert (got_u != other).sum() > 100


def test_every_backend_offers_dense_momentum():
    """The modules ``backend_for`` hands out (twin, compiled, CuPy: emulated here) all have it, with the
    twin's bits."""
    import dgc.kernels as K
    from test_kernels_emulator import available, emulated_backend

    modules = [K.backend_for(torch.device("cpu")), K.backend_for(torch.device("cpu"), "torch")]
    if available() is None:
        modules.append(emulated_backend()[0])
    g, u = dense_inputs(70_001, seed=5)
    want = dense_run(reference, g, u, 0.9, 4)
    for module in modules:
        got = dense_run(module, g, u, 0.9, 4)
        assert same_bits(got[0], want[0]) and same_bits(got[1], want[1]), module.__name__
        halves_g, halves_u = g.clone(), u.clone()
        module.dense_momentum_many([halves_g[:30_000], halves_g[30_000:]], [halves_u[:30_000], halves_u[30_000:]],
                                   0.9, 4)
        assert same_bits(halves_g, want[0]) and same_bits(halves_u, want[1]), module.__name__


def test_dense_momentum_other_inputs_go_to_the_twin():
    """Strided or float64 tensors: the twin's result, written in place (nothing lost in a copy)."""
    gen = torch.Generator().manual_seed(7)
    wide, u = torch.randn(5000, 2, generator=gen), torch.randn(5000, generator=gen)
    for impl in (reference, cpu_fused):
        g = wide.clone()[:, 0]  # strided
        uu = u.clone()
        impl.dense_momentum(g, uu, 0.9, 3)
        assert same_bits(uu, torch.add(wide[:, 0], u, alpha=0.9))
        assert same_bits(g, uu / 3)
    g64, u64 = wide[:, 1].double().contiguous(), u.double()
    want = dense_run(reference, g64, u64, 0.9, 3)
    got = dense_run(cpu_fused, g64, u64, 0.9, 3)
    assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])


def test_dense_direct_path_same_bits_on_both_backends():
    """``DGCState.compress_dense_in_place`` (the direct path after the first delivered step) with the
    compiled path and with the twins: the same payloads and the same u over several steps."""
    import dgc

    shapes = {"w": (300, 70), "b": (70,)}
    out = {}
    for backend in ("auto", "torch"):
        config = dgc.DGCConfig(dense_steps=0, min_compress_numel=1, momentum=0.9, backend=backend)
        state = dgc.DGCState(config, [(n, torch.nn.Parameter(torch.zeros(s))) for n, s in shapes.items()])
        gen = torch.Generator().manual_seed(11)
        sent, direct = [], []
        for _ in range(3):
            for name, shape in shapes.items():
                buf = torch.randn(torch.Size(shape).numel(), generator=gen)
                direct.append(state.compress_dense_in_place(name, buf, divide=3))
                if not direct[-1]:
                    state.finish_dense(name, torch.float32)
                sent.append(buf)
        out[backend] = (sent, [state.memory[n].momentum.clone() for n in shapes], direct)
    assert any(out["auto"][2]), "the direct path never ran"
    assert out["auto"][2] == out["torch"][2]
    for a, b in zip(out["auto"][0] + out["auto"][1], out["torch"][0] + out["torch"][1], strict=True):
        assert same_bits(a, b)


@pytest.mark.parametrize("divide", [1, 4])
def test_dense_momentum_many_equals_one_call_per_tensor(divide):
    """A bucket's tensors in one compiled call (views of one buffer, empty and tiny tensors among them,
    the threads' split falling inside tensors): every tensor's bits as :func:`dense_momentum` gives them."""
    sizes = [0, 1, 7, 300_001, 0, 64, 10**6 + 3, 5]
    g_all, _ = dense_inputs(sum(sizes), seed=11)
    us = [dense_inputs(n, seed=20 + i)[1] for i, n in enumerate(sizes)]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    want_g = g_all.clone()
    want_u = [u.clone() for u in us]
    for o, n, u in zip(offsets, sizes, want_u, strict=True):
        reference.dense_momentum(want_g[o : o + n], u, 0.9, divide)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            for impl in (cpu_fused, reference):
                g = g_all.clone()
                got_u = [u.clone() for u in us]
                impl.dense_momentum_many([g[o : o + n] for o, n in zip(offsets, sizes, strict=True)], got_u, 0.9, divide)
                assert same_bits(g, want_g), f"{impl.__name__}: g differs ({t} threads)"
                for i, (a, b) in enumerate(zip(got_u, want_u, strict=True)):
                    assert same_bits(a, b), f"{impl.__name__}: u of tensor {i} differs ({t} threads)"
    finally:
        torch.set_num_threads(threads)


def test_dense_momentum_many_refuses_unpaired_lists_and_sends_odd_tensors_to_the_twin():
    g, u = dense_inputs(1000, seed=2)
    with pytest.raises(ValueError, match="2 gradients but 1 momentum"):
        cpu_fused.dense_momentum_many([g, g], [u], 0.9, 2)
    wide = torch.randn(500, 2)
    strided, uu = wide.clone()[:, 0], torch.randn(500)
    plain_g, plain_u = g.clone(), u.clone()
    want = dense_run(reference, strided, uu, 0.9, 3), dense_run(reference, g, u, 0.9, 3)
    s_g, s_u = strided.clone(), uu.clone()
    cpu_fused.dense_momentum_many([s_g, plain_g], [s_u, plain_u], 0.9, 3)
    assert same_bits(s_g, want[0][0]) and same_bits(s_u, want[0][1])
    assert same_bits(plain_g, want[1][0]) and same_bits(plain_u, want[1][1])
