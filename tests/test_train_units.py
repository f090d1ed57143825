"""Unit tests of the launcher's pieces: batches, clipping, schedules, traffic, RNG, data, summary."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from dgc.stats import CompressionStats
from dgc.training.batches import ShardedBatches
from dgc.training.clipping import LocalGradClip
from dgc.training.data import stdlib_files, stdlib_text, synthetic_images
from dgc.training.logger import MetricsLogger, Progress
from dgc.training.metrics import TaskMeter, Traffic
from dgc.training.models import CNN, CharLSTM, ResNet
from dgc.training.rng import get_rng_state, seed_everything, set_rng_state
from dgc.training.runtime import DDPRuntime, Runtime
from dgc.training.schedule import constant, cosine
from dgc.training.summary import RunDescription, format_banner, format_epoch, format_summary


def test_shards_are_disjoint_equal_and_cover_the_epoch():
    world, n, bs = 3, 100, 4
    shards = [ShardedBatches(n, batch_size=bs, rank=r, world_size=world, seed=7) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == (n // world) // bs
    seen = [torch.cat(list(s.epoch(2))) for s in shards]
    everything = torch.cat(seen)
    assert len(set(everything.tolist())) == len(everything)  # disjoint
    other_epoch = torch.cat(list(shards[0].epoch(3)))
    assert not torch.equal(seen[0], other_epoch)  # reshuffled per epoch
    assert torch.equal(seen[0], torch.cat(list(shards[0].epoch(2))))  # reproducible


def test_batches_resume_mid_epoch():
    b = ShardedBatches(64, batch_size=5, rank=1, world_size=2, seed=0)
    full = list(b.epoch(4))
    tail = list(b.epoch(4, start=3))
    assert len(tail) == len(full) - 3
    assert all(torch.equal(x, y) for x, y in zip(full[3:], tail, strict=True))


def test_batch_larger_than_shard_is_a_clear_error():
    with pytest.raises(ValueError, match="train.batch_size = 64 is too large"):
        ShardedBatches(100, batch_size=64, rank=0, world_size=4, seed=0)


def test_local_grad_clip_clips_each_tensor_to_max_norm_over_sqrt_n():
    model = torch.nn.Linear(10, 10)
    LocalGradClip(model, 2.0, world_size=4)  # threshold 1.0
    (model(torch.full((3, 10), 100.0)).sum()).backward()
    for p in model.parameters():
        assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(1.0, rel=1e-4)
    small = torch.nn.Linear(2, 1)
    LocalGradClip(small, 100.0, world_size=1)
    small(torch.ones(1, 2)).sum().backward()
    assert torch.equal(small.weight.grad, torch.ones(1, 2))  # below the threshold: untouched


def test_schedules():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine(opt, total_steps=10, warmup_steps=2, min_ratio=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:10], lrs[2:11], strict=True))
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    constant(opt2, total_steps=5)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine(opt2, total_steps=5, warmup_steps=-1)


def test_traffic_and_task_meters():
    t = Traffic()
    a = CompressionStats()
    a.add(sent=100, received=200, dense=1000, elements=250, elements_sent=10)
    b = CompressionStats()
    b.add(sent=300, received=600, dense=1000, elements=250, elements_sent=30)
    t.add(a)
    t.add(b)
    assert t.bytes_sent_per_step == 200 and t.compression_ratio == 5.0
    assert t.achieved_density == pytest.approx(40 / 500)
    assert Traffic.from_state_dict(t.state_dict()) == t
    m = TaskMeter()
    m.add(loss_sum=2.0 * 10, correct=7, count=10)
    r = m.result(language_model=True)
    assert r["loss"] == 2.0 and r["accuracy"] == 70.0 and r["perplexity"] == pytest.approx(math.e**2)


def test_rng_state_round_trip_through_weights_only(tmp_path):
    seed_everything(3)
    torch.rand(3), random.random(), np.random.rand()
    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(5), random.random(), np.random.rand(2))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(5), random.random(), np.random.rand(2))
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1]
    assert np.array_equal(expected[2], got[2])


def test_stdlib_corpus_is_deterministic_python_source():
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files, key=lambda p: p.as_posix())
    a = stdlib_text(megabytes=0.02, seq_len=16)
    b = stdlib_text(megabytes=0.02, seq_len=16)
    assert torch.equal(a.train.inputs, b.train.inputs)
    text = bytes(a.train.inputs[:4].reshape(-1).tolist()).decode("ascii")
    assert "import" in text or "def " in text or '"""' in text or "#" in text


def test_synthetic_images_are_learnable_and_seeded():
    a = synthetic_images(train_size=50, test_size=10, seed=1)
    b = synthetic_images(train_size=50, test_size=10, seed=1)
    assert torch.equal(a.train.inputs, b.train.inputs)
    clean = synthetic_images(train_size=50, test_size=10, noise=0.0, seed=1)
    same = clean.train.targets[:, None] == clean.train.targets[None, :]
    flat = clean.train.inputs.flatten(1)
    assert torch.equal(torch.cdist(flat, flat) < 1.0, same)  # noise 0: one image per class


@pytest.mark.parametrize("model,x", [
    (CNN(), torch.randn(2, 1, 28, 28)),
    (CNN(image_size=8), torch.randn(2, 1, 8, 8)),
    (CharLSTM(hidden=32, embed_dim=8), torch.randint(128, (2, 7))),
    (ResNet(depth=8, width=4), torch.randn(2, 3, 32, 32)),
])
def test_models_give_logits_in_the_last_dimension(model, x):
    out = model(x)
    assert out.shape[:-1] == x.shape[: out.dim() - 1] and out.shape[-1] in (10, 128)


def test_model_arguments_are_checked():
    with pytest.raises(ValueError, match="image_size"):
        CNN(image_size=30)
    with pytest.raises(ValueError, match="depth"):
        ResNet(depth=21)


def test_jsonl_logger_writes_rank0_only(tmp_path):
    log0 = MetricsLogger(log_every=1)
    log0.open(tmp_path / "a", enabled=True)
    log0.log({"event": "step", "step": 1, "loss": float("nan")})
    log0.close()
    assert (tmp_path / "a" / "metrics.jsonl").read_text().strip() == (
        '{"event": "step", "step": 1, "loss": null}')
    log1 = MetricsLogger()
    log1.open(tmp_path / "b", enabled=False)
    log1.log({"event": "step", "step": 1})
    assert not (tmp_path / "b").exists()


def test_summary_formats():
    record = {"epoch": 1, "step": 10, "train_loss": 1.0, "train_accuracy": 50.0, "test_loss": 0.5,
              "test_accuracy": 80.0, "step_time_s": 0.01, "bytes_sent_per_step": 5480.0,
              "dense_bytes_per_step": 1_686_568.0, "compression_ratio": 307.8,
              "achieved_density": 0.00224}
    line = format_epoch(record, 10)
    assert "epoch 1/10" in line and "5.48 kB" in line and "307.8x" in line
    summary = {**record, "model": "CNN", "parameters": 421642, "data": "mnist-5k", "world_size": 2,
               "backend": "gloo", "device": "cpu", "compression": "DGC", "epochs_done": 1.0,
               "train_seconds": 1.0, "bytes_received_per_step": 10960.0, "out_dir": "x",
               "last_step_bytes_sent": 5480, "last_step_compression_ratio": 307.8,
               "last_step_density": 0.00224}
    text = format_summary(summary)
    assert "421,642 parameters" in text and "last step" in text and "307.8x" in text


def test_progress_in_a_captured_log_is_plain_lines_at_most_every_interval(caplog):
    caplog.set_level("INFO", logger="dgc.training.logger")
    bar = Progress(enabled=True, interval_s=1e-9, tty=False)
    bar.start("epoch 1/3", total=4)
    bar.update(loss="2.3000")
    bar.update()
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["epoch 1/3: step 1/4 | loss 2.3000", "epoch 1/3: step 2/4 | loss 2.3000"]
    slow = Progress(enabled=True, interval_s=3600, tty=False)
    slow.start("epoch 1/3", total=4)
    slow.update()
    assert len(caplog.records) == 2  # not yet an interval since the start
    off = Progress(enabled=False, tty=False)
    off.start("epoch 1/3", total=4)
    off.update()
    assert len(caplog.records) == 2
    with pytest.raises(ValueError, match="logger.progress_interval_s"):
        MetricsLogger(progress_interval_s=0)


def test_the_ddp_runtime_is_a_runtime():
    runtime = DDPRuntime()
    assert isinstance(runtime, Runtime)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    runtime.synchronize(opt)  # nothing to wait for: DDP averaged during backward()
    with runtime.skip_synchronize(opt):
        opt.step()


def test_banner_is_one_line_naming_what_runs():
    line = format_banner(RunDescription(
        model="CNN", parameters=421642, data="mnist-5k", train_samples=4000, test_samples=1000,
        compression="DGC: density 0.001", world_size=2, backend="gloo", device="cpu",
        precision="fp16", compiled=True, epochs=5, steps_per_epoch=62, batch_size=32,
        config_file="outputs/x/config.yaml"))
    assert "\n" not in line
    for part in ("CNN (421,642 parameters)", "mnist-5k", "2 ranks (gloo, cpu)", "fp16",
                 "compiled", "DGC: density 0.001", "outputs/x/config.yaml"):
        assert part in line, part
