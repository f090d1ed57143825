"""Every prune/ and act/ config group option builds and runs; the sparsity report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

import dgc
from dgc.activation import ActivationMonitor, SparseInputLinear, TopKActivation
from dgc.error_sparsity import ErrorMonitor
from dgc.pruning import Pruner
from dgc.sparsity_monitors import SparsityMonitors
from dgc.sparsity_report import sparsity_report

CONF = Path(__file__).resolve().parents[1] / "conf"
PRUNE_OPTIONS = sorted(p.stem for p in (CONF / "prune").glob("*.yaml"))
ACT_OPTIONS = sorted(p.stem for p in (CONF / "act").glob("*.yaml"))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(),
                                  nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def _compose(group: str, option: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=[f"+{group}={option}", *overrides])[group]


def test_every_group_option_is_listed():
    assert {"oneshot_unstructured", "agp_bank_balanced", "nm_2_4", "channel", "block"} <= set(
        PRUNE_OPTIONS)
    assert {"measure", "topk", "sparse_linear"} <= set(ACT_OPTIONS)


@pytest.mark.parametrize("option", PRUNE_OPTIONS)
def test_prune_option_builds_and_reaches_its_sparsity(option):
    overrides = ["prune.exclude=[conv1]"] if option == "nm_2_4" else []
    cfg = _compose("prune", option, *overrides)
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = instantiate(cfg)(model=model, optimizer=opt, total_steps=20)
    assert isinstance(pruner, Pruner)
    x = torch.randn(4, 1, 8, 8)
    for step in range(20):
        pruner.step(step)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    target = cfg.schedule.sparsity
    layer = pruner.layer_sparsity()
    if option == "global_unstructured":  # one ranking: the total is exact, layers differ
        total = sum(t.param.numel() for t in pruner.targets)
        assert abs(pruner.global_sparsity() - target) <= 0.5 / total
    else:
        for t in pruner.targets:  # each layer within half of its structural unit of the target
            tol = _unit(pruner.granularity, t.param) / 2 / t.param.numel()
            assert abs(layer[t.name] - target) <= tol + 1e-9, (t.name, layer[t.name], tol)
    assert all(t.param[~t.mask].eq(0).all() for t in pruner.targets)


def _unit(granularity, weight: torch.Tensor) -> int:
    """Entries by which a layer's pruned count can move (the granularity's rounding step)."""
    fan_in = weight[0].numel()
    name = type(granularity).__name__
    if name == "BankBalanced":  # one entry in every bank of a row (balance="row")
        assert granularity.balance == "row"
        return fan_in // granularity.bank_size_for(weight)
    if name == "Block":
        return granularity.block_shape[0] * granularity.block_shape[1]
    if name == "Channel":
        return fan_in
    return 1  # Unstructured; NM lands exactly on (m - n) / m


@pytest.mark.parametrize("option", ACT_OPTIONS)
def test_act_option_builds_a_monitor(option):
    cfg = _compose("act", option)
    model = Net()
    monitors = instantiate(cfg)(model=model)
    assert isinstance(monitors, SparsityMonitors)
    assert isinstance(monitors.activations, ActivationMonitor)
    assert isinstance(monitors.errors, ErrorMonitor)
    model(torch.randn(16, 1, 8, 8)).square().mean().backward()
    assert monitors.activations.summary()
    assert monitors.errors.summary()
    if cfg.topk is not None:
        assert any(isinstance(m, TopKActivation) for m in model.modules())
    if cfg.sparse_linear:
        assert sum(isinstance(m, SparseInputLinear) for m in model.modules()) == 2


def test_sparsity_report_markdown_and_json():
    torch.manual_seed(0)
    model = Net()
    pruner = Pruner(model, granularity=dgc.pruning.Unstructured(),
                    schedule=dgc.pruning.OneShot(sparsity=0.5))
    pruner.step(0)
    monitor = ActivationMonitor(model)
    state = dgc.DGCState(dgc.DGCConfig(density=0.01, dense_steps=0), model.named_parameters())
    pruner.attach_dgc(state)
    model(torch.randn(8, 1, 8, 8))
    report = sparsity_report(model, monitor, state)
    w = report.weights["head.1.weight"]
    assert w.masked and w.zeros == int((model.head[1].weight == 0).sum())
    assert w.sparsity == pytest.approx(0.5, abs=1e-3)
    assert report.activations["head.2"].sparsity == pytest.approx(
        monitor.summary()["head.2"].sparsity)
    g = report.gradients["head.1.weight"]
    assert g.compressed and g.live == w.numel - w.zeros
    assert g.sent == state.k_for("head.1.weight") and g.density == pytest.approx(g.sent / g.numel)
    assert not report.gradients["head.1.bias"].compressed
    assert report.gradients["head.1.bias"].density == 1.0
    md = report.to_markdown()
    for heading in ("### Weight sparsity", "### Activation sparsity", "### Gradient density"):
        assert heading in md
    assert "| head.1.weight | 8192 | 4096 | 50.00% | yes |" in md
    data = json.loads(report.to_json())
    assert data["weights"]["head.1.weight"]["zeros"] == w.zeros
    assert data["gradients"]["head.1.weight"]["sent"] == g.sent
    empty = sparsity_report(nn.Linear(3, 3)).to_markdown()
    assert "(no activation monitor)" in empty and "(no DGC state)" in empty
