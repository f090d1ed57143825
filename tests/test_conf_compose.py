"""Every option of every config group composes (Hydra compose API) and builds what it names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import dgc
from dgc.training import register_configs
from dgc.training.communication import Communication
from dgc.training.dgc_communication import DGCCommunication
from dgc.training.torch_hooks import FP16Compression, PowerSGD

CONF = Path(__file__).resolve().parent.parent / "conf"
DEFAULT_GROUPS = ("model", "data", "optim", "scheduler", "logger", "dist", "experiment")
OPTIONAL_GROUPS = ("compress", "prune", "act")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(*overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["train.out_dir=/tmp/dgc-test-out", *overrides])
    OmegaConf.resolve(cfg)  # every interpolation must resolve
    return cfg


def test_every_group_has_options():
    for group in (*DEFAULT_GROUPS, "compress"):
        assert options(group), f"conf/{group}/ is empty"
    assert set(options("compress")) >= {"dgc", "topk", "fp16", "powersgd"}


@pytest.mark.parametrize("group,option",
                         [(g, o) for g in DEFAULT_GROUPS for o in options(g)])
def test_default_group_option_composes(group, option):
    cfg = _compose(f"{group}={option}")
    for key in ("model", "data", "optim", "scheduler", "logger", "dist"):
        assert cfg[key]["_target_"], f"{group}={option}: {key} lost its _target_"
    # Optional groups stay off, except where an experiment is about them.
    enabled = {"prune_dgc_mnist": {"compress", "prune"}}.get(option, set()) \
        if group == "experiment" else set()
    assert {g for g in OPTIONAL_GROUPS if cfg[g] is not None} == enabled


@pytest.mark.parametrize("group,option",
                         [(g, o) for g in OPTIONAL_GROUPS for o in options(g)])
def test_optional_group_option_composes_with_plus(group, option):
    cfg = _compose(f"+{group}={option}")
    assert cfg[group]["_target_"]
    with pytest.raises(ConfigCompositionException):  # not in the defaults list: "+" is required
        _compose(f"{group}={option}")


@pytest.mark.parametrize("option", options("model"))
def test_model_options_build_modules(option):
    data = {"cnn": "mnist", "char_lstm": "stdlib_text", "resnet": "synthetic"}[option]
    cfg = _compose(f"model={option}", f"data={data}")
    model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module) and sum(p.numel() for p in model.parameters()) > 1000


@pytest.mark.parametrize("option", options("data"))
def test_data_options_build_data_matching_their_declared_shape(option):
    cfg = _compose(f"data={option}")
    if option == "stdlib_text":
        cfg.data.megabytes = 0.05
    data = instantiate(cfg.data)
    assert len(data.train) > len(data.test) > 0
    if data.language_model:
        assert int(data.train.inputs.max()) < cfg.data.vocab_size
        assert torch.equal(data.train.inputs[:, 1:], data.train.targets[:, :-1])  # shifted by one
    else:
        assert data.train.inputs.shape[1:] == (cfg.data.in_channels, cfg.data.image_size,
                                               cfg.data.image_size)
        assert int(data.train.targets.max()) == cfg.data.num_classes - 1


def test_compress_options_build_their_communication():
    built = {o: instantiate(_compose(f"+compress={o}").compress) for o in options("compress")}
    assert all(isinstance(c, Communication) for c in built.values())
    dgc_comm, topk = built["dgc"], built["topk"]
    assert isinstance(dgc_comm, DGCCommunication) and isinstance(topk, DGCCommunication)
    assert isinstance(dgc_comm.config, dgc.DGCConfig)
    assert dgc_comm.config.density == 0.001 and dgc_comm.warmup_epochs is not None
    assert dgc_comm.config.momentum == 0.9  # taken from optim=sgd
    assert topk.config.momentum == 0.0 and topk.config.density == dgc_comm.config.density
    assert isinstance(built["fp16"], FP16Compression)
    assert isinstance(built["powersgd"], PowerSGD)
    assert built["powersgd"].kwargs["matrix_approximation_rank"] >= 1


def test_dgc_momentum_follows_optim():
    cfg = _compose("+compress=dgc", "optim.momentum=0.95", "optim.weight_decay=1e-4")
    comm = instantiate(cfg.compress)
    assert comm.config.momentum == 0.95 and comm.config.weight_decay == 1e-4
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    opt = comm.make_optimizer(params, cfg.optim)
    assert isinstance(opt, dgc.DGCSGD)  # momentum and weight decay live in DGC now
    assert opt.param_groups[0]["momentum"] == 0 and opt.param_groups[0]["weight_decay"] == 0
    assert opt.param_groups[0]["lr"] == cfg.optim.lr


def test_topk_keeps_the_configured_optimizer():
    cfg = _compose("+compress=topk", "optim=adam")
    opt = instantiate(cfg.compress).make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.optim)
    assert isinstance(opt, torch.optim.Adam)


def test_schema_rejects_unknown_and_mistyped_train_keys():
    with pytest.raises(ConfigCompositionException, match="epocs"):
        _compose("train.epocs=3")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose("train.epochs=three")


def test_unknown_option_is_a_clear_error():
    with pytest.raises(MissingConfigException, match="compress/nope"):
        _compose("+compress=nope")
