"""Horovod worker for tests/test_int8_values.py: ``horovodrun --gloo -np 2 python int8_workers.py OUT``.

Trains a small model with ``dgc.horovod.DistributedOptimizer`` and ``value_dtype="int8"``, checks the
conservation invariant at every step (what arrived + mean residual == mean corrected gradient, summed
over steps) and that the ranks' parameters stay identical; rank 0 writes the figures to OUT as JSON.
"""

from __future__ import annotations

import sys

import horovod.torch as hvd
import torch
import torch.nn as nn
from horovod_workers.hvd_main import run_and_report

import dgc
import dgc.horovod


class Net(nn.Module):
    """Two compressible weights (2048 and 512 elements) and two small biases (a grouped allreduce)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _max_over_ranks(value: float) -> float:
    return float(hvd.allreduce(torch.tensor([value], dtype=torch.float64), op=hvd.Max).item())


def run(steps: int = 7) -> dict:
    cfg = dgc.DGCConfig(density=0.05, momentum=0.9, dense_steps=2, min_compress_numel=128, value_dtype="int8")
    torch.manual_seed(0)
    model = Net()
    opt = dgc.horovod.DistributedOptimizer(dgc.DGCSGD(model.parameters(), lr=0.1), model.named_parameters(),
                                           config=cfg)
    n = hvd.size()
    names = [name for name, _ in model.named_parameters()]
    sum_u = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    sum_sent = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1000 + hvd.rank())
    max_rel_err, sparse_steps = 0.0, 0
    for _ in range(steps):
        x, y = torch.randn(8, 32, generator=gen), torch.randn(8, 8, generator=gen)
        state = opt.dgc_state
        u_prev = {name: state.memory[name].momentum.view(state.memory[name].shape).clone() for name in names}
        local: dict[str, torch.Tensor] = {}
        hooks = [
            p.register_hook(lambda g, name=name, store=local: store.__setitem__(name, g.detach().clone()))
            for name, p in model.named_parameters()
        ]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for h in hooks:
            h.remove()
        opt.synchronize()
        sparse_steps += state.stats.sparse_buckets > 0
        for name, p in model.named_parameters():
            corrected = cfg.momentum * u_prev[name] + local[name]
            sum_u[name] += hvd.allreduce(corrected, op=hvd.Sum, name=f"u.{name}") / n
            sum_sent[name] += p.grad
            v = state.memory[name].residual.view(p.shape)
            mean_v = hvd.allreduce(v.clone(), op=hvd.Sum, name=f"v.{name}") / n
            err = (sum_sent[name] + mean_v - sum_u[name]).abs().max().item()
            max_rel_err = max(max_rel_err, err / (sum_u[name].abs().max().item() + 1e-6))
        with opt.skip_synchronize():
            opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rank0 = hvd.broadcast(flat.clone(), root_rank=0, name="params")
    layouts = list(opt.dgc_state.codec._layouts.values())
    return {
        "max_rel_err": _max_over_ranks(max_rel_err),
        "max_rank_diff": _max_over_ranks((flat - rank0).abs().max().item()),
        "sparse_steps": sparse_steps,
        "wire_dtype": str(next(lay.wire_dtype for lay in layouts if lay.compressed)),
    }


def main() -> None:
    run_and_report(run, sys.argv[1])


if __name__ == "__main__":
    main()
