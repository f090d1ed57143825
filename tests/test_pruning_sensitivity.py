"""layer_sensitivity: one layer pruned at a time, on a copy; the table and its markdown."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgc.pruning import NM, BankBalanced, layer_sensitivity
from dgc.pruning.sensitivity import DEFAULT_SPARSITIES


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def _agreement_with(reference: nn.Module, x: torch.Tensor):
    """Metric: fraction of inputs where the model predicts what ``reference`` predicts now."""
    with torch.no_grad():
        labels = reference(x).argmax(1)

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return (m(x).argmax(1) == labels).float().mean().item()

    return evaluate


def test_each_layer_alone_at_each_sparsity_and_the_model_is_left_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(1))
    agree = _agreement_with(model, x)
    layers = ["0", "2", "4"]
    seen: list[dict[str, float]] = []  # weight sparsity of every layer, per evaluation

    def evaluate(m: nn.Module) -> float:
        assert m is not model or not seen, "a trial ran on the caller's model"
        seen.append({n: (m.get_submodule(n).weight == 0).float().mean().item() for n in layers})
        return agree(m)

    result = layer_sensitivity(model, evaluate)
    # Table shape: one row per layer, one column per sparsity (0, 5, ..., 95%).
    assert result.sparsities == list(DEFAULT_SPARSITIES) and len(result.sparsities) == 20
    assert list(result.accuracy) == [f"{n}.weight" for n in layers]
    assert all(len(accs) == 20 for accs in result.accuracy.values())
    # The baseline first, then each (layer, sparsity) with that layer alone pruned.
    assert result.baseline == 1.0 and seen[0] == dict.fromkeys(layers, 0.0)
    trials = iter(seen[1:])
    for name in layers:
        for s in result.sparsities:
            zeros = next(trials)
            assert zeros[name] == pytest.approx(s, abs=1 / model.get_submodule(name).weight.numel())
            assert all(zeros[o] == 0.0 for o in layers if o != name)
    assert next(trials, None) is None
    for accs in result.accuracy.values():
        assert accs[0] == result.baseline  # 0% pruned is the unpruned model
        assert accs[-1] < accs[0]  # 95% pruned changes predictions
        assert min(accs[:5]) >= max(accs[-3:])  # roughly monotone: light pruning beats heavy
    for k, v in model.state_dict().items():  # every trial pruned a copy
        assert torch.equal(v, before[k]), k


def test_markdown_has_every_column_and_row():
    model = _model()
    result = layer_sensitivity(model, lambda m: 0.5, granularity=BankBalanced(bank_size=8),
                               layers=["2"])
    lines = result.to_markdown().splitlines()
    assert lines[0] == "| layer | " + " | ".join(f"{5 * i}%" for i in range(20)) + " |"
    assert lines[2].startswith("| 2.weight | 0.500 |") and lines[2].count("|") == 22
    assert len(lines) == 3


def test_validation_and_nm_cap():
    model = _model()
    with pytest.raises(ValueError, match="sparsities <= 0.5"):
        layer_sensitivity(model, lambda m: 0.0, granularity=NM(), layers=["2"])
    result = layer_sensitivity(model, lambda m: 0.0, granularity=NM(), layers=["2"],
                               sparsities=[0.0, 0.25, 0.5])
    assert len(result.accuracy["2.weight"]) == 3
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        layer_sensitivity(model, lambda m: 0.0, sparsities=[1.0])
    with pytest.raises(ValueError, match="not a module with a weight"):
        layer_sensitivity(model, lambda m: 0.0, layers=["1"])
