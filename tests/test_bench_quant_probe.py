"""The bandwidth benchmark's codec probe for the quantized methods (dgc/bench/bandwidth/quant_probe.py):
on a one-rank group it does one of N workers' work (the transport's functions, the collectives looped
back), where the real hook would take the one-worker path and quantize nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dgc.bench import bandwidth
from dgc.bench.bandwidth.methods import MethodContext
from dgc.bench.bandwidth.options import RunOptions
from dgc.bench.bandwidth.quant_probe import ProbeCommunication, ProbeState, probe_hook
from dgc.quant import BlockQuantizer, QuantConfig, QuantState, quant_hook
from dgc.quant.exchange import ExchangePlan
from dgc.training.quant_communication import QuantCommunication

QUANT = ("int8", "terngrad", "qsgd")


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The element count of every quantizer encode call (every method's quantizer)."""
    calls: list[int] = []
    real = BlockQuantizer.encode

    def counted(self, x, **kwargs):
        calls.append(x.numel())
        return real(self, x, **kwargs)

    monkeypatch.setattr(BlockQuantizer, "encode", counted)
    return calls


@pytest.fixture
def one_rank() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model() -> nn.Module:
    torch.manual_seed(0)  # 792,586 float32 parameters (3.2 MB of gradient), two DDP buckets
    return nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def _steps(make_state, hook, steps: int = 2) -> tuple[QuantState, list[int]]:
    """``steps`` DDP steps with ``hook`` on ``make_state(named_parameters)``; the state and the
    bucket sizes of the last step."""
    model = _model()
    state = make_state(model.named_parameters())
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1.0, gradient_as_bucket_view=True)
    sizes: list[int] = []

    def recording(state, bucket):  # DDP checks the parameter is named `bucket`
        sizes.append(bucket.buffer().numel())
        return hook(state, bucket)

    ddp.register_comm_hook(state, recording)
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        sizes.clear()
        ddp(x).square().mean().backward()
        for p in model.parameters():
            assert torch.isfinite(p.grad).all()
            p.grad = None
    return state, sizes


def test_probe_state_is_rank_zero_of_n() -> None:
    params = list(_model().named_parameters())
    state = ProbeState(QuantConfig(method="int8"), params, 4)
    assert (state.world_size, state.rank) == (4, 0)
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="N >= 2"):
            ProbeState(QuantConfig(method="int8"), params, bad)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", QUANT)
def test_probe_does_one_of_n_workers_work(method: str, one_rank: None, encodes: list[int]) -> None:
    """On the same one-rank group the real hook quantizes nothing; the probe for N = 4 quantizes
    N - 1 shards and its shard's average per bucket, and counts the bytes of 4 workers."""
    n = 4
    config = QuantConfig(method=method)
    real, _ = _steps(lambda named: QuantState(config, named), quant_hook)
    assert real.world_size == 1
    assert encodes == [] and real.stats.bytes_sent == 0 and not real.residuals

    probe, sizes = _steps(lambda named: ProbeState(config, named, n), probe_hook)
    total = sum(p.numel() for p in _model().parameters())
    assert sum(sizes) == total and len(sizes) >= 2, sizes
    plans = [ExchangePlan.of(s, n, probe.quantizer) for s in sizes]
    # The last step, per bucket: N - 1 shards for the others and the own shard's average.
    last = encodes[-n * len(sizes):]
    assert sorted(last) == sorted(p.shard for p in plans for _ in range(n))
    assert sum(last) == sum(p.padded for p in plans) >= total  # the whole gradient, once
    assert len(encodes) >= 2 * n  # every step quantized
    assert probe.stats.bytes_sent == sum(n * p.message_bytes for p in plans)
    assert probe.network_bytes == sum(2 * (n - 1) * p.message_bytes for p in plans)
    assert probe.stats.elements_sent == total and probe.step == 2
    assert set(probe.residuals) == {name for name, _ in _model().named_parameters()}


def test_method_build_threads_the_codec_world_size() -> None:
    """Only the codec run of N > 1 processes builds the probe; the real runs keep the real class."""
    for name in QUANT:
        spec = bandwidth.METHODS[name]
        for ctx in (MethodContext(backend="gloo"), MethodContext(backend="gloo", codec_world_size=1)):
            assert type(spec.build(ctx)) is QuantCommunication
        probe = spec.build(MethodContext(backend="gloo", codec_world_size=3))
        assert isinstance(probe, ProbeCommunication) and probe.world_size == 3
        assert probe.quant_config == spec.build(MethodContext(backend="gloo")).quant_config
    for name in ("dense", "dgc-int8", "fp16"):
        spec = bandwidth.METHODS[name]
        assert type(spec.build(MethodContext(backend="gloo", codec_world_size=3))) is type(
            spec.build(MethodContext(backend="gloo")))


@pytest.mark.timeout(90)
def test_measure_codec_runs_the_probe_for_n_processes(encodes: list[int]) -> None:
    """measure_codec's world_size reaches the quantized method: N = 4 quantizes, N = 1 does not."""
    opts = RunOptions(model="tiny", methods=("dense", "int8"), compute="synthetic", warmup=3,
                      steps=1, local_steps=1, replay=0, bucket_cap_mb=25.0)
    cpu = torch.device("cpu")
    out = bandwidth.measure_codec(opts, "gloo", cpu, 0, world_size=1)
    assert set(out) == {"dense", "int8"} and encodes == []
    out = bandwidth.measure_codec(opts, "gloo", cpu, 0, world_size=4)
    assert set(out["int8"]) == {"local_step_s", "local_cpu_s"} and out["int8"]["local_step_s"] > 0
    # 3 warm-up + 1 measured steps, each bucket 3 shards + the average
    assert len(encodes) >= 4 * 4 and len(encodes) % 4 == 0
    assert not dist.is_initialized()
