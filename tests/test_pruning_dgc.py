"""Pruning with DGC: pruned coordinates are never selected or sent; momentum/residual stay 0."""

from __future__ import annotations

import math

import pytest
import torch
from _dist import run_distributed
from torch import nn

import dgc
from dgc.pruning import AGP, BankBalanced, OneShot, Pruner, Unstructured
from dgc.sparsity_report import sparsity_report


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _config(**kw) -> dgc.DGCConfig:
    base = {"density": 0.05, "dense_steps": 0, "sample_ratio": 1.0, "min_compress_numel": 16}
    return dgc.DGCConfig(**(base | kw))


def test_compress_never_selects_pruned_coordinates():
    torch.manual_seed(0)
    model = Net()
    state = dgc.DGCState(_config(), model.named_parameters())
    name = "fc1.weight"
    assert state.is_compressed(name)
    # Momentum and residual build up everywhere before pruning.
    for _ in range(3):
        state.compress(name, torch.randn(48, 64))
    mem = state.memory[name]
    assert (mem.residual != 0).any()
    pruner = Pruner(model, granularity=Unstructured(), schedule=OneShot(sparsity=0.9),
                    dgc_state=state)
    pruner.step(0)
    keep = model.fc1.weight_mask.reshape(-1)
    assert torch.equal(mem.mask, keep)
    assert (mem.residual[~keep] == 0).all() and (mem.momentum[~keep] == 0).all()
    for i in range(5):
        grad = torch.randn(48, 64, generator=torch.Generator().manual_seed(i))
        grad.reshape(-1)[~keep] = 1e6  # huge where pruned: would win any top-k
        ct = state.compress(name, grad)
        idx = ct.indices.long()
        assert idx.numel() == state.k_for(name) == math.ceil(0.05 * int(keep.sum()))  # live only
        assert keep[idx].all(), "a pruned coordinate was selected"
        assert (mem.residual[~keep] == 0).all() and (mem.momentum[~keep] == 0).all()


def test_attach_dgc_maps_ddp_prefixed_names_and_follows_mask_updates():
    torch.manual_seed(0)
    model = Net()
    wrapper = nn.Module()
    wrapper.module = model  # a DGCState built from ddp_model.named_parameters() sees 'module.'
    state = dgc.DGCState(_config(), wrapper.named_parameters())
    pruner = Pruner(model, granularity=BankBalanced(bank_size=16),
                    schedule=AGP(sparsity=0.75, start_step=0, end_step=4, frequency=2))
    pruner.attach_dgc(state)
    for step in range(5):
        pruner.step(step)
        mem = state.memory["module.fc1.weight"]
        assert torch.equal(mem.mask, model.fc1.weight_mask.reshape(-1))
    assert state.memory["module.fc1.weight"].live == int(model.fc1.weight_mask.sum())
    assert state.memory["module.fc1.bias"].mask is None
    report = sparsity_report(model, None, state)
    g = report.gradients["module.fc1.weight"]
    assert g.live == int(model.fc1.weight_mask.sum()) and g.sent == state.k_for("module.fc1.weight")
    pruner.remove()
    assert state.memory["module.fc1.weight"].mask is None


def _ddp_worker(rank: int, world_size: int, config: dict | None = None) -> dict:
    torch.manual_seed(0)  # same init on every rank
    model = Net()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = dgc.DGCSGD(ddp.parameters(), lr=0.1)
    state = dgc.register(ddp, opt, _config(**({"density": 0.02, "momentum": 0.9} | (config or {}))))
    sent: list[tuple[str, torch.Tensor]] = []
    compress = state.compress

    def recording(name, grad, **kw):
        ct = compress(name, grad, **kw)
        sent.append((name, ct.indices.long().clone()))
        return ct

    state.compress = recording
    pruner = Pruner(ddp, granularity=Unstructured(), optimizer=opt, dgc_state=state,
                    schedule=AGP(sparsity=0.8, start_step=2, end_step=10, frequency=2))
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    violations = 0
    for step in range(14):
        pruner.step(step)
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        masks = {n.removeprefix("module."): m.reshape(-1) for n, m in
                 {"fc1.weight": model.fc1.weight_mask, "fc2.weight": model.fc2.weight_mask}.items()}
        for name, idx in sent:
            if name in masks:
                violations += int((~masks[name][idx]).sum())
        sent.clear()
        opt.step()
    assert state.config.weight_decay == (config or {}).get("weight_decay", 0.0)
    return {
        "masks": {k: v.clone() for k, v in pruner.masks.items()},
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "violations": violations,
        "sparsity": pruner.global_sparsity(),
        "pruned_nonzero": sum(int((t.param[~t.mask] != 0).sum()) for t in pruner.targets),
        "mem_nonzero": sum(int((m.residual[~m.mask] != 0).sum())
                           + int((m.momentum[~m.mask] != 0).sum())
                           for m in state.memory.values() if m.mask is not None),
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("config", [{}, {"weight_decay": 0.05}], ids=["plain", "weight_decay"])
def test_two_rank_ddp_dgc_agp_masks_identical_and_never_sent(config):
    """Also with DGC's own weight decay (added to the gradient before momentum correction):
    pruned weights stay exactly zero and their residual and momentum stay zero."""
    r0, r1 = run_distributed(_ddp_worker, 2, config)
    for r in (r0, r1):
        assert r["violations"] == 0
        assert r["pruned_nonzero"] == 0 and r["mem_nonzero"] == 0
        assert r["sparsity"] == pytest.approx(0.8, abs=1e-3)
    for name, mask in r0["masks"].items():
        assert torch.equal(mask, r1["masks"][name])
    for name, w in r0["weights"].items():
        torch.testing.assert_close(w, r1["weights"][name])
