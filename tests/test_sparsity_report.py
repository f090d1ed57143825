"""dgc.error_sparsity / dgc.sparsity_report: the natural zeros of the backpropagated errors.

Tiny models whose ReLU and max-pooling patterns are known in advance: the error reaching a
layer's output must be zero exactly where the ReLU above was off or the pooling window did not
pick the position, and the report must show those figures beside the other tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

import dgc
from dgc.activation import ActivationMonitor
from dgc.error_sparsity import ErrorMonitor, weight_layers
from dgc.sparsity_monitors import SparsityMonitors, build_sparsity_monitors
from dgc.sparsity_report import sparsity_report
from dgc.training.models import CNN

CONF = Path(__file__).resolve().parents[1] / "conf"


def _relu_net(inplace: bool = False) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """Linear(3, 4) -> ReLU -> Linear(4, 2) with a known sign pattern of the hidden layer.

    Weights are the identity on the first three units plus a unit that is always off, so the
    hidden pre-activation is (x0, x1, x2, -1): its sign pattern is the input's plus one
    always-negative column. Returns the model, a batch and the expected "ReLU off" mask.
    """
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=inplace), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]))
        net[0].bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0]))
        net[2].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]]))
        net[2].bias.zero_()
    x = torch.tensor([[1.0, -2.0, 3.0], [-1.0, -1.0, 2.0], [0.5, 0.5, 0.5], [-3.0, 1.0, -1.0],
                      [2.0, 2.0, -2.0]])
    off = torch.cat([x <= 0, torch.ones(len(x), 1, dtype=torch.bool)], dim=1)
    return net, x, off


@pytest.mark.parametrize("inplace", [False, True])
def test_error_at_a_relu_gated_layer_is_zero_exactly_where_the_relu_was_off(inplace):
    net, x, off = _relu_net(inplace)
    monitor = ErrorMonitor(net)
    net(x).sum().backward()
    s = monitor.summary()
    assert set(s) == {"0", "2"}
    # Layer 0's output error dL/dh = W2^T 1 * relu'(h): zero where the ReLU was off, else not.
    assert s["0"].output_sparsity == pytest.approx(off.float().mean().item())
    assert s["0"].output_sparsity == pytest.approx(11 / 20)
    assert s["0"].input_sparsity is None  # the data needs no gradient
    # Layer 2's output error is dL/dy = 1: dense; its input error W2^T 1 has no zero column.
    assert s["2"].output_sparsity == 0.0
    assert s["2"].input_sparsity == 0.0
    assert s["0"].batches == s["2"].batches == 1


def test_error_through_max_pooling_keeps_one_position_per_window():
    """Identity 1x1 conv -> ReLU -> 2x2 max-pool: the error reaching the conv's output is
    non-zero only at each window's maximum, and only where that maximum is positive."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    net = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(6, 1, 8, 8)  # distinct values: one maximum per window
    monitor = ErrorMonitor(net)
    net(x).sum().backward()
    windows = x.reshape(6, 4, 2, 4, 2)
    passing = (windows.amax(dim=(2, 4)) > 0).float()  # the window's max passed the ReLU
    # ... and the Linear's weight column for that pooled position is non-zero (random init).
    expected_nonzero = passing.sum().item()
    assert monitor.summary()["0"].output_sparsity == pytest.approx(
        1 - expected_nonzero / x.numel())
    assert monitor.summary()["0"].output_sparsity >= 0.75  # 3 of 4 positions at least


def test_only_measured_training_passes_count():
    net, x, off = _relu_net()
    monitor = ErrorMonitor(net, every=2)
    net(x).sum().backward()                   # measured
    net(-x).sum().backward()                  # skipped (every=2)
    net.eval()
    net(-x).sum().backward()                  # eval mode: not counted
    net.train()
    with torch.no_grad():
        net(x)                                # no autograd: not counted
    s = monitor.summary()
    assert s["0"].batches == 1
    assert s["0"].output_sparsity == pytest.approx(off.float().mean().item())
    net(-x).sum().backward()                  # the third training pass: measured
    assert monitor.summary()["0"].batches == 2
    monitor.reset()
    assert monitor.summary() == {}
    monitor.remove()
    net(x).sum().backward()
    assert monitor.summary() == {}


def test_every_must_be_a_positive_int():
    with pytest.raises(ValueError, match="every"):
        ErrorMonitor(nn.Linear(2, 2), every=0)
    with pytest.raises(TypeError, match="act.errors"):
        build_sparsity_monitors(nn.Linear(2, 2), errors="yes")


def test_weight_layers_are_the_weight_tables_layers():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8, 2))
    assert list(weight_layers(net)) == ["0", "4"]  # BatchNorm's weight is 1-D


def test_report_shows_the_error_table_beside_the_others():
    net, x, off = _relu_net()
    monitors = build_sparsity_monitors(net)  # measure only: no top-k, no sparse linear
    assert isinstance(monitors.activations, ActivationMonitor)
    state = dgc.DGCState(dgc.DGCConfig(density=0.5, dense_steps=0, min_compress_numel=1),
                         net.named_parameters())
    net(x).sum().backward()
    report = sparsity_report(net, monitors, state)
    assert report.errors["0"].output_sparsity == pytest.approx(off.float().mean().item())
    assert report.activations["1"].sparsity == pytest.approx(off.float().mean().item())
    md = report.to_markdown()
    for heading in ("### Weight sparsity", "### Activation sparsity",
                    "### Backpropagated error sparsity (natural)", "### Gradient density"):
        assert heading in md
    assert "| 0 | 55.00% |  | 1 |" in md and "| 2 | 0.00% | 0.00% | 1 |" in md
    assert json.loads(report.to_json())["errors"]["0"]["output_sparsity"] == pytest.approx(0.55)
    # An explicit error monitor wins over the bundled one; none at all says so.
    other = ErrorMonitor(net)
    assert sparsity_report(net, monitors, error_monitor=other).errors == {}
    assert "(no error monitor)" in sparsity_report(net, monitors.activations).to_markdown()


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "act").glob("*.yaml")))
def test_every_act_option_measures_errors(option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+act={option}"])["act"]
    torch.manual_seed(0)
    model = CNN(image_size=8, channels=[4, 8], hidden=16, dropout=0.0)
    monitors = instantiate(cfg)(model=model)
    assert isinstance(monitors, SparsityMonitors) and monitors.errors is not None
    model(torch.randn(8, 1, 8, 8)).logsumexp(dim=1).sum().backward()
    errors = sparsity_report(model, monitors).errors
    assert set(errors) == {"features.0", "features.3", "classifier.2", "classifier.5"}
    # Conv outputs go through ReLU and 2x2 max-pooling: at least 3 of 4 errors are zero.
    assert errors["features.0"].output_sparsity >= 0.75
    assert errors["features.3"].output_sparsity >= 0.75
    assert errors["classifier.5"].output_sparsity < 0.5  # the logits' error is dense
