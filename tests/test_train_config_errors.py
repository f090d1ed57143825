"""A bad config fails with a clear error before any process group starts; bad resumes fail clearly."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dgc.training import register_configs, train
from dgc.training.checkpoint import load_checkpoint, save_checkpoint
from dgc.training.runtime import DDPRuntime

CONF = Path(__file__).resolve().parent.parent / "conf"


def _compose(tmp_path: Path, *overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"train.out_dir={tmp_path}", "data=digits",
                                            "logger.progress=false", *overrides])


@pytest.fixture
def no_process_group(monkeypatch):
    """Fail the test if the loop gets as far as starting a process group."""

    def forbidden(self):
        raise AssertionError("a process group was started before the config was validated")

    monkeypatch.setattr(DDPRuntime, "init", forbidden)
    yield
    assert not dist.is_initialized()


@pytest.mark.parametrize("overrides,match", [
    (("+compress=dgc", "compress.config.density=0"), r"compress: DGCConfig\.density = 0"),
    (("+compress=dgc", "compress.config.momentum=1.5"), r"DGCConfig\.momentum"),
    (("+compress=topk", "compress.config.value_dtype=int4"), r"value_dtype"),
    (("+compress=dgc", "compress.warmup_epochs=-1"), r"warmup_epochs"),
    (("+compress=dgc", "optim=adam"), r"needs plain SGD.*optim=sgd"),
    (("+compress=powersgd", "compress.matrix_approximation_rank=0"), r"matrix_approximation_rank"),
    (("+compress=powersgd", "compress.start_powerSGD_iter=1"), r"start_powerSGD_iter"),
    (("train.batch_size=0",), r"train\.batch_size = 0"),
    (("train.max_steps=0",), r"train\.max_steps = 0"),
    (("train.local_grad_clip=-1",), r"train\.local_grad_clip"),
    (("dist.backend=mpi",), r"dist\.backend"),
    (("logger.log_every=0",), r"logger\.log_every"),
    (("model=char_lstm",), r"CharLSTM cannot take the inputs"),
    (("model.dropout=1.5",), r"model\.dropout"),
    (("train.precision=fp8",), r"train\.precision = 'fp8' is invalid: use 32, bf16 or fp16"),
    (("train.precision=fp16", "train.loss_scale=0.5"), r"train\.loss_scale = 0\.5"),
    (("train.precision=fp16", "train.loss_scale_growth_interval=0"),
     r"train\.loss_scale_growth_interval"),
    (("train.precision=fp16", "+compress=powersgd"),
     r"train\.precision=fp16 cannot run with compress=powersgd"),
    (("train.precision=fp16", "+compress=dgc", "compress.config.check_finite=false"),
     r"train\.precision=fp16 with compress=dgc needs compress\.config\.check_finite=true"),
    (("train.compile=true", "train.compile_backend=nope"), r"train\.compile_backend = 'nope'"),
])
def test_bad_config_fails_before_the_process_group(tmp_path, no_process_group, overrides, match):
    cfg = _compose(tmp_path, *overrides)
    with pytest.raises((ValueError, TypeError), match=match):
        train(cfg)


def test_wandb_logger_without_wandb_is_a_clear_error(tmp_path, no_process_group):
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed: the missing-package error cannot happen")
    cfg = _compose(tmp_path, "logger=wandb")
    with pytest.raises(ValueError, match=r"logger=wandb needs the wandb package"):
        train(cfg)


def test_misspelled_compress_key_is_named(tmp_path, no_process_group):
    cfg = _compose(tmp_path, "+compress=powersgd", "+compress.matrix_rank=2")
    with pytest.raises(TypeError, match="matrix_rank"):
        train(cfg)


def test_precision_32_from_the_command_line_is_the_string_32(tmp_path):
    from omegaconf import OmegaConf

    settings = OmegaConf.to_object(_compose(tmp_path, "train.precision=32").train)
    assert settings.precision == "32"
    assert OmegaConf.to_object(_compose(tmp_path, "train.precision=bf16").train).precision == "bf16"


def test_inductor_without_a_cpp_compiler_fails_before_the_process_group(tmp_path, no_process_group,
                                                                       monkeypatch):
    import dgc.training.compiled as compiled

    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    monkeypatch.setattr(compiled.torch.cuda, "is_available", lambda: False)
    cfg = _compose(tmp_path, "train.compile=true")
    with pytest.raises(ValueError, match=r"train\.compile=true with train\.compile_backend=inductor "
                                         r"needs a C\+\+ compiler"):
        train(cfg)


def test_a_dist_target_without_the_runtime_methods_is_named(tmp_path, no_process_group):
    cfg = _compose(tmp_path, "dist._target_=dgc.training.metrics.TaskMeter", "~dist.backend",
                   "~dist.bucket_cap_mb", "~dist.gradient_as_bucket_view",
                   "~dist.broadcast_buffers", "~dist.find_unused_parameters",
                   "~dist.static_graph", "~dist.timeout_s")
    with pytest.raises(TypeError, match=r"dist\._target_ = dgc\.training\.metrics\.TaskMeter .*Runtime"):
        train(cfg)


def _fake_checkpoint(root: Path, world_size: int) -> None:
    common = {"epoch": 0, "batch": 1, "world_size": world_size, "model": {}, "optimizer": {},
              "scheduler": {}, "comm": "none", "config": ""}
    barrier = threading.Barrier(world_size)  # save_checkpoint is collective: one thread per rank
    errors: list[BaseException] = []

    def save(rank: int) -> None:
        try:
            save_checkpoint(root, 1, rank=rank, common=common, per_rank={"rank": rank},
                            barrier=barrier.wait)
        except BaseException as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=save, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors


def test_resume_with_another_world_size_is_a_clear_error(tmp_path):
    _fake_checkpoint(tmp_path / "ckpt", world_size=2)
    common, mine = load_checkpoint(tmp_path / "ckpt", rank=1, world_size=2)  # via 'latest'
    assert common["step"] == 1 and mine == {"rank": 1}
    with pytest.raises(ValueError, match="written by 2 ranks and this run has 4"):
        load_checkpoint(tmp_path / "ckpt", rank=0, world_size=4)


def test_resume_from_a_non_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(tmp_path, rank=0, world_size=1)


def test_checkpoint_files_load_with_weights_only(tmp_path):
    _fake_checkpoint(tmp_path / "ckpt", world_size=1)
    folder = tmp_path / "ckpt" / "step-00000001"
    # (each file has a .sha256 beside it since checkpoints carry checksums)
    assert sorted(p.name for p in folder.glob("*.pt")) == ["common.pt", "rank-00000.pt"]
    torch.load(folder / "common.pt", weights_only=True)
    assert not list((tmp_path / "ckpt").glob(".*partial"))  # assembled, then renamed


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    _fake_checkpoint(root, world_size=1)
    import dgc.training.checkpoint as ck

    def crash(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "atomic_save", crash)
    with pytest.raises(OSError):
        save_checkpoint(root, 2, rank=0, common={"world_size": 1}, per_rank={},
                        barrier=lambda: None)
    common, _ = load_checkpoint(root, rank=0, world_size=1)
    assert common["step"] == 1  # 'latest' still names the complete step-1 checkpoint
