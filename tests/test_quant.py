"""dgc.quant on one process: packing, the three quantizers, error feedback, unbiasedness, bad input,
the exchange's message sizes, the config and the launcher options."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dgc.quant import (
    QSGD,
    Encoded,
    ExchangePlan,
    Int8Quantizer,
    QuantConfig,
    QuantState,
    TernGrad,
    int8,
    qsgd,
    quantize_with_feedback,
    terngrad,
)
from dgc.quant.blocks import as_blocks
from dgc.quant.packing import pack_bits, packed_bytes, unpack_bits

FAST = settings(max_examples=40, deadline=None)


def vectors(max_size: int = 300):
    floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)
    return st.lists(floats, min_size=0, max_size=max_size).map(
        lambda v: torch.tensor(v, dtype=torch.float32))


def quantizers():
    chunk = st.one_of(st.none(), st.integers(1, 64))
    stochastic = st.booleans()
    return st.one_of(
        st.builds(lambda b, c, s: Int8Quantizer(bits=b, chunk_size=c, stochastic=s),
                  st.integers(3, 8), chunk, stochastic),
        st.builds(lambda c, s: TernGrad(chunk_size=c, stochastic=s), chunk, stochastic),
        st.builds(lambda lv, c, s: QSGD(levels=lv, chunk_size=c, stochastic=s),
                  st.integers(1, 127), chunk, stochastic),
    )


def step_of(q, blocks_scale: torch.Tensor) -> torch.Tensor:
    """Distance between two neighbouring levels, per block."""
    return blocks_scale / q.levels


# ---------------------------------------------------------------------------- packing
@FAST
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_unpack_round_trip(bits, data):
    n = data.draw(st.integers(0, 200))
    codes = torch.tensor(data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n)),
                         dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n).long(), codes)


def test_packing_is_dense_and_little_endian():
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_bits(torch.tensor([5, 7]), 3).tolist() == [5 | 7 << 3]  # 6 bits in one byte
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([1]), 9)


# ---------------------------------------------------------------------------- round trips
@FAST
@given(q=quantizers(), x=vectors())
def test_round_trip_within_one_level_and_sizes_fixed(q, x):
    g = torch.Generator().manual_seed(0)
    enc = q.encode(x, generator=g)
    out = q.decode(enc)
    assert out.dtype == torch.float32 and out.shape == (x.numel(),)
    assert enc.codes.numel() == packed_bytes(x.numel(), q.bits) and enc.nbytes == q.nbytes(x.numel())
    blocks = as_blocks(x, q.chunk_size)
    scale = q.block_scales(blocks)
    assert torch.isfinite(enc.scales).all()
    step = step_of(q, scale).unsqueeze(1).expand_as(blocks).reshape(-1)[: x.numel()]
    err = (out - x).abs()
    # nearest: half a level; stochastic: below one level (plus float32 slack)
    bound = step * (1.0 if q.stochastic else 0.5) * (1 + 1e-5) + 1e-6 * x.abs().amax(dim=0, keepdim=True).clamp_min(1) if x.numel() else step
    assert torch.all(err <= bound), (err - bound).max()
    # never flips a sign; zeros stay zero
    assert torch.all(out * x >= 0) and torch.all(out[x == 0] == 0)
    if not q.stochastic:  # round to nearest never overshoots: a contraction, element by element
        assert torch.all(err <= x.abs() * (1 + 1e-6) + 1e-30)


@FAST
@given(q=quantizers(), x=vectors(100))
def test_bytes_round_trip(q, x):
    enc = q.encode(x, generator=torch.Generator().manual_seed(1))
    raw = enc.to_bytes()
    assert raw.dtype == torch.uint8 and raw.numel() == enc.nbytes and raw.numel() % 4 == 0
    back = q.from_bytes(raw, x.numel())
    assert torch.equal(q.decode(back), q.decode(enc))


def test_module_functions_match_the_classes():
    x = torch.randn(1000)
    for mod, cls, kw in ((int8, Int8Quantizer, {"bits": 6}), (terngrad, TernGrad, {}),
                         (qsgd, QSGD, {"levels": 3})):
        a = mod.encode(x, chunk_size=100, stochastic=False, **kw)
        b = cls(chunk_size=100, stochastic=False, **kw).encode(x)
        assert isinstance(a, Encoded) and torch.equal(a.codes, b.codes)
        assert torch.equal(mod.decode(a), cls(chunk_size=100, **kw).decode(b))


def test_wire_width():
    assert Int8Quantizer().bits == 8 and TernGrad().bits == 2
    assert [QSGD(levels=s).bits for s in (1, 3, 7, 15, 127)] == [2, 3, 4, 5, 8]
    n = 1 << 16  # per-chunk scales cost 32 bits per chunk, nothing else
    assert TernGrad(chunk_size=512).nbytes(n) == n // 4 + 4 * (n // 512)
    assert Int8Quantizer(chunk_size=None).nbytes(n) == n + 4


def test_terngrad_sends_only_three_values():
    x = torch.randn(4096)
    for stochastic in (True, False):
        out = terngrad.decode(terngrad.encode(x, chunk_size=None, stochastic=stochastic,
                                              generator=torch.Generator().manual_seed(0)))
        s = x.abs().max()
        assert set(out.unique().tolist()) <= {-s.item(), 0.0, s.item()}


def test_int8_scale_and_zero_point():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 2.0])
    enc = int8.encode(x)
    assert enc.scales.tolist() == [2.0] and enc.levels == 127
    # round(x / (2/127)) + zero point 127; -63.5 rounds half to even (-64)
    assert enc.codes.tolist() == [0, 63, 127, 159, 254]


# ---------------------------------------------------------------------------- error feedback
@FAST
@given(q=quantizers(), data=st.data())
def test_error_feedback_keeps_everything(q, data):
    x = data.draw(vectors(200))
    old = torch.randn(x.numel(), generator=torch.Generator().manual_seed(x.numel())) * 3
    f = quantize_with_feedback(q, x, old, generator=torch.Generator().manual_seed(2))
    assert torch.equal(f.sent, q.decode(f.encoded))
    tol = 1e-6 * max(1.0, float((x.abs() + old.abs()).amax())) if x.numel() else 0.0
    assert torch.allclose(f.sent + f.residual, x + old, rtol=0, atol=float(tol))
    plain = quantize_with_feedback(q, x, None)
    assert plain.residual is None


@pytest.mark.parametrize("q", [Int8Quantizer(chunk_size=256), TernGrad(chunk_size=256, stochastic=False),
                               QSGD(chunk_size=256, stochastic=False)])
def test_error_feedback_cumulative_error_stays_bounded(q):
    """Deterministic rounding with error feedback: sum(sent) - sum(g) = -residual stays of the
    size of one step's error; without feedback the same rounding drifts away."""
    torch.manual_seed(0)
    residual, drift_fb, drift_plain = torch.zeros(2048), torch.zeros(2048), torch.zeros(2048)
    bias = torch.linspace(-0.3, 0.3, 2048)  # a persistent component that rounding can miss
    for _ in range(100):
        g = torch.randn(2048) * 0.1 + bias
        f = quantize_with_feedback(q, g, residual)
        residual = f.residual
        drift_fb += f.sent - g
        drift_plain += q.decode(q.encode(g)) - g
    assert torch.allclose(drift_fb, -residual, atol=1e-3)
    assert drift_fb.norm() < 0.2 * drift_plain.norm()


# ---------------------------------------------------------------------------- unbiasedness
@pytest.mark.parametrize("make", [lambda s: Int8Quantizer(bits=4, stochastic=s),
                                  lambda s: TernGrad(stochastic=s),
                                  lambda s: QSGD(levels=2, stochastic=s)])
def test_stochastic_rounding_is_unbiased(make):
    """Mean of K independent encodings within 5 sigma of x (sigma <= level/2/sqrt(K)); the same
    check fails for round-to-nearest, so it can tell."""
    x = torch.tensor([0.9, -0.37, 0.21, 0.0, -1.0, 0.55, 0.013, -0.66])
    k = 20000
    reps = x.repeat(k)  # chunk_size = len(x): every repetition is its own block, same scale
    results = {}
    for stochastic in (True, False):
        q = make(stochastic)
        q = type(q)(**{**q.__dict__, "chunk_size": x.numel()})
        out = q.decode(q.encode(reps, generator=torch.Generator().manual_seed(3)))
        results[stochastic] = out.view(k, -1).double().mean(dim=0).float()
    level = q.block_scales(x.view(1, -1))[0] / q.levels
    bound = 5 * (level / 2) / math.sqrt(k)
    assert torch.all((results[True] - x).abs() <= bound), (results[True] - x, bound)
    assert torch.any((results[False] - x).abs() > bound)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make", [Int8Quantizer, TernGrad, QSGD])
def test_zero_tensor_sends_zeros_never_nan(make):
    q = make(chunk_size=4)
    enc = q.encode(torch.zeros(10))
    assert torch.equal(enc.scales, torch.zeros(3))
    assert torch.equal(q.decode(enc), torch.zeros(10))
    assert q.decode(q.encode(torch.zeros(0))).numel() == 0


@pytest.mark.parametrize("make", [Int8Quantizer, TernGrad, QSGD])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_raises_or_propagates_per_block(make, bad):
    x = torch.arange(12, dtype=torch.float32)
    x[5] = bad
    with pytest.raises(FloatingPointError, match="non-finite"):
        make(chunk_size=4).encode(x)
    q = make(chunk_size=4, nonfinite="propagate")
    out = q.decode(q.encode(x))
    assert torch.isnan(out[4:8]).all()  # the block holding it
    assert torch.isfinite(out[:4]).all() and torch.isfinite(out[8:]).all()


@pytest.mark.parametrize("kwargs,field,reason", [
    (dict(bits=2), "bits", "headroom"),
    (dict(bits=1), "bits", "headroom"),
    (dict(bits=9), "bits", "3 to 8"),
    (dict(method="qsgd", levels=0), "levels", "1 to 127"),
    (dict(method="qsgd", levels=128), "levels", "1 to 127"),
    (dict(method="terngrad", bits=4), "bits", "only for method='int8'"),
    (dict(method="int8", levels=3), "levels", "only for method='qsgd'"),
    (dict(chunk_size=0), "chunk_size", ">= 1"),
    (dict(method="int4"), "method", "int8"),
    (dict(nonfinite="ignore"), "nonfinite", "raise"),
    (dict(method="qsgd", stochastic=True), "stochastic", "not a contraction"),
    (dict(method="terngrad", stochastic=True), "stochastic", "error_feedback=False"),
])
def test_config_errors_name_the_field(kwargs, field, reason):
    with pytest.raises(ValueError) as e:
        QuantConfig(**kwargs)
    assert f"QuantConfig.{field}" in str(e.value) and reason in str(e.value)


def test_config_types_and_defaults():
    with pytest.raises(TypeError, match="QuantConfig.error_feedback"):
        QuantConfig(error_feedback="yes")
    with pytest.raises(TypeError, match="QuantConfig.seed"):
        QuantConfig(seed=1.5)
    assert not QuantConfig(method="terngrad").rounding_is_stochastic  # error feedback: nearest
    assert QuantConfig(method="terngrad", error_feedback=False).rounding_is_stochastic  # the paper
    assert QuantConfig(method="int8", stochastic=True).rounding_is_stochastic  # allowed with EF
    assert QuantConfig(method="qsgd", levels=15).bits_per_element == 5


# ---------------------------------------------------------------------------- exchange sizes
@pytest.mark.parametrize("cfg", [QuantConfig(), QuantConfig(method="terngrad"),
                                 QuantConfig(method="qsgd"), QuantConfig(chunk_size=None)])
def test_bytes_per_worker_do_not_grow_with_world_size(cfg):
    """Cost model: a worker hands (N-1) shards to the all-to-all and one to the all-gather, about
    n*bits/8 bytes whatever N (an allgather of whole quantized tensors: N times that received)."""
    q, n = cfg.quantizer(), 1_000_003
    ideal = n * q.bits / 8
    for world in (2, 3, 4, 8, 16, 64):
        plan = ExchangePlan.of(n, world, q)
        assert plan.padded >= n and plan.shard * (world - 1) < n
        sent = world * plan.message_bytes  # (N-1) all-to-all messages + 1 all-gather message
        assert ideal <= sent <= ideal * 1.07 + 8 * world, (world, sent / ideal)


# ---------------------------------------------------------------------------- state, one rank
class _Bucket:
    """The few GradBucket methods quant_hook calls."""

    def __init__(self, params, grads):
        self._params, self._buffer = params, torch.cat([g.reshape(-1) for g in grads])

    def buffer(self):
        return self._buffer

    def parameters(self):
        return self._params

    def index(self):
        return 0

    def is_last(self):
        return True


def test_single_worker_hook_is_exact_and_state_round_trips():
    from dgc.quant import quant_hook

    model = torch.nn.Linear(4, 3)
    state = QuantState(QuantConfig(), model.named_parameters())
    assert state.world_size == 1
    state.residuals["weight"] = torch.ones(12)  # e.g. loaded from a multi-rank checkpoint
    grads = [torch.randn(3, 4), torch.randn(3)]
    out = quant_hook(state, _Bucket(list(model.parameters()), grads)).wait()
    assert torch.equal(out, torch.cat([grads[0].reshape(-1) + 1, grads[1]]))
    assert not state.residuals and state.step == 1
    state.residuals["bias"] = torch.full((3,), 0.5)
    saved = state.state_dict()
    other = QuantState(QuantConfig(), model.named_parameters())
    other.load_state_dict(saved)
    assert other.step == 1 and torch.equal(other.residuals["bias"], saved["residuals"]["bias"])
    with pytest.raises(ValueError, match="method"):
        QuantState(QuantConfig(method="qsgd"), model.named_parameters()).load_state_dict(saved)
    with pytest.raises(ValueError, match="unknown parameters"):
        other.load_state_dict({**saved, "residuals": {"nope": torch.zeros(1)}})


def test_single_worker_nonfinite_raises_and_is_not_counted():
    from dgc.errors import NonFiniteGradientError
    from dgc.quant import quant_hook

    model = torch.nn.Linear(2, 1)
    state = QuantState(QuantConfig(), model.named_parameters())
    with pytest.raises(NonFiniteGradientError):
        quant_hook(state, _Bucket(list(model.parameters()),
                                  [torch.tensor([[float("nan"), 1.0]]), torch.ones(1)]))
    assert state.step == 0
    propagate = QuantState(QuantConfig(nonfinite="propagate"), model.named_parameters())
    out = quant_hook(propagate, _Bucket(list(model.parameters()),
                                        [torch.tensor([[float("inf"), 1.0]]), torch.ones(1)])).wait()
    assert torch.isnan(out).all() and propagate.step == 0


# ---------------------------------------------------------------------------- launcher options
@pytest.mark.parametrize("option", ["int8", "terngrad", "qsgd"])
def test_compress_option_composes_and_builds(option):
    from hydra.utils import instantiate
    from test_conf_compose import _compose

    from dgc.training.quant_communication import QuantCommunication

    cfg = _compose(f"+compress={option}", "seed=7")
    comm = instantiate(cfg.compress)
    assert isinstance(comm, QuantCommunication) and comm.name == option
    c = comm.quant_config
    assert c.method == option and c.error_feedback and c.seed == 7 and c.chunk_size == 512
    assert comm.describe().startswith(option)
    with pytest.raises(ValueError, match="dist=ddp or dist=horovod"):
        comm.check(dist_name="mpi", optim=cfg.optim)
    bad = _compose(f"+compress={option}", "compress.config.chunk_size=0")
    with pytest.raises(Exception, match="chunk_size"):
        instantiate(bad.compress)
    off = instantiate(_compose(f"+compress={option}", "compress.config.error_feedback=false").compress)
    assert off.quant_config.rounding_is_stochastic == (option != "int8")
