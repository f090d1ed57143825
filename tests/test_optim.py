"""The optimizer rules: momentum and weight decay are applied exactly once."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dgc


def _params():
    return [nn.Parameter(torch.zeros(4, 4))]


@pytest.mark.parametrize(
    ("opt", "cfg", "match"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), dgc.DGCConfig(), "momentum would be applied twice"),
        (lambda p: torch.optim.Adam(p), dgc.DGCConfig(), "momentum=0"),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-4),
            dgc.DGCConfig(weight_decay=1e-4),
            "weight decay would be applied twice",
        ),
    ],
)
def test_check_optimizer_rejects_double_application(opt, cfg, match):
    with pytest.raises(ValueError, match=match):
        dgc.check_optimizer(opt(_params()), cfg)


@pytest.mark.parametrize(
    ("opt", "cfg"),
    [
        (lambda p: dgc.DGCSGD(p, lr=0.1), dgc.DGCConfig()),
        (lambda p: dgc.DGCSGD(p, lr=0.1, weight_decay=1e-4), dgc.DGCConfig()),
        (lambda p: torch.optim.Adam(p), dgc.DGCConfig(momentum=0.0)),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), dgc.DGCConfig(momentum=0.0)),
    ],
)
def test_check_optimizer_accepts_valid(opt, cfg):
    dgc.check_optimizer(opt(_params()), cfg)


def test_dgcsgd_has_no_momentum():
    opt = dgc.DGCSGD(_params(), lr=0.1)
    assert opt.param_groups[0]["momentum"] == 0.0
    with pytest.raises(ValueError, match="momentum must be 0"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "momentum": 0.9})


def test_register_needs_ddp():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        dgc.register(nn.Linear(2, 2), None)
