"""Workers of tests/test_reliability_ddp.py (spawned gloo processes): misuse and faults on the DDP hook."""

from __future__ import annotations

import torch
import torch.nn as nn
from ddp_workers import ToyModel
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc


def _data(rank: int, steps: int, micro: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [[(torch.randn(8, 10, generator=gen), torch.randn(8, 5, generator=gen)) for _ in range(micro)]
            for _ in range(steps)]


def _train(ddp: DDP, opt: torch.optim.Optimizer, batches, synchronized: bool) -> None:
    for step in batches:
        opt.zero_grad()
        for i, (x, y) in enumerate(step):
            if synchronized or i == len(step) - 1:
                nn.functional.mse_loss(ddp(x), y).backward()
            else:
                with ddp.no_sync():
                    nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()


def accumulation(rank: int, world: int, cfg: dict, steps: int = 5, micro: int = 3) -> dict:
    """Synchronized micro-batches with DGC, against (a) DDP + SGD(momentum) and (b) DGC with no_sync()."""
    batches = _data(rank, steps, micro)
    out = {}
    torch.manual_seed(0)
    plain = DDP(ToyModel())
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=cfg.get("momentum", 0.9))
    _train(plain, opt, batches, synchronized=True)
    out["sgd"] = {n: p.detach().clone() for n, p in plain.module.named_parameters()}
    for mode in ("synchronized", "no_sync"):
        torch.manual_seed(0)
        ddp = DDP(ToyModel())
        opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
        state = dgc.register(ddp, opt, dgc.DGCConfig(**cfg))
        _train(ddp, opt, batches, synchronized=mode == "synchronized")
        out[mode] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
        out[mode + "_step"] = state.step
    return out


def accumulation_unknown_optimizer(rank: int, world: int) -> str:
    """The plain register_comm_hook line: DGC cannot know the optimizer before its first step."""
    torch.manual_seed(0)
    ddp = DDP(ToyModel())
    state = dgc.DGCState(dgc.DGCConfig(), ddp.module.named_parameters())
    ddp.register_comm_hook(state, dgc.ddp_comm_hook)
    (x, y), = _data(rank, 1, 1)[0]
    nn.functional.mse_loss(ddp(x), y).backward()
    try:
        nn.functional.mse_loss(ddp(x), y).backward()
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def mismatch(rank: int, world: int, field: str, values: list) -> str:
    """Rank r builds its state with ``field = values[r]``; returns what the first backward raised."""
    torch.manual_seed(0)
    ddp = DDP(ToyModel())
    opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
    dgc.register(ddp, opt, dgc.DGCConfig(**{"min_compress_numel": 16, field: values[rank]}))
    (x, y), = _data(rank, 1, 1)[0]
    try:
        nn.functional.mse_loss(ddp(x), y).backward()
    except dgc.RankMismatchError as exc:
        return f"RankMismatchError: {exc}"
    return "no error"


def nan_on_one_rank(rank: int, world: int, steps: int = 4, bad: int = 2) -> dict:
    """A NaN on rank 1 at step ``bad``: every rank raises a FloatingPointError from backward(), the
    step is not counted, and a loop that calls optimizer.step() anyway keeps the ranks identical."""
    torch.manual_seed(0)
    ddp = DDP(ToyModel())
    opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
    state = dgc.register(ddp, opt, dgc.DGCConfig(density=0.05, min_compress_numel=16))
    errors, steps_seen, grads_at_failure = [], [], None
    for step, ((x, y),) in enumerate(_data(rank, steps, 1)):
        opt.zero_grad()
        if step == bad and rank == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        try:
            nn.functional.mse_loss(ddp(x), y).backward()
        except FloatingPointError as exc:
            errors.append((step, type(exc).__name__))
            grads_at_failure = {n: p.grad.clone() for n, p in ddp.module.named_parameters()}
        opt.step()  # a careless loop steps anyway
        steps_seen.append(state.step)
        if errors:
            break  # DDP's reducer is not reusable after an exception inside backward
    return {
        "errors": errors,
        "steps": steps_seen,
        "grads": grads_at_failure,
        "params": {n: p.detach().clone() for n, p in ddp.module.named_parameters()},
    }


def auto_policy(rank: int, world: int, steps: int = 6) -> dict:
    """policy="auto", deciding every step: the decisions of every step, on every rank."""
    torch.manual_seed(0)
    ddp = DDP(ToyModel(), bucket_cap_mb=0.001)  # several buckets
    opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
    cfg = dgc.DGCConfig(density=0.05, min_compress_numel=16, policy="auto", policy_interval=1)
    state = dgc.register(ddp, opt, cfg)
    decisions, kinds = [], []
    for (x, y), in _data(rank, steps, 1):
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        decisions.append(sorted(state.policy.decisions.items()))
        kinds.append((state.stats.sparse_buckets, state.stats.dense_buckets))
    return {"decisions": decisions, "kinds": kinds, "samples": len(state.policy.link.samples)}


def hierarchy(rank: int, world: int, cfg: dict, steps: int = 4) -> dict:
    """The same training flat and with hierarchy="node" (2 simulated nodes of 2 ranks)."""
    out = {}
    for mode in ("flat", "node"):
        torch.manual_seed(0)
        ddp = DDP(ToyModel(), bucket_cap_mb=0.001)
        opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
        config = dgc.DGCConfig(**cfg, hierarchy=mode)
        state = dgc.register(ddp, opt, config, node_groups=[[0, 1], [2, 3]] if mode == "node" else None)
        received = 0
        for (x, y), in _data(rank, steps, 1):
            opt.zero_grad()
            nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
            received += state.stats.bytes_received
        out[mode] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
        out[mode + "_received"] = received
        out[mode + "_sparse"] = state.stats.sparse_buckets
    return out


def nan_propagate(rank: int, world: int, steps: int = 4, bad: int = 2) -> dict:
    """nonfinite="propagate": the failed step hands NaN to every rank and is not counted."""
    torch.manual_seed(0)
    ddp = DDP(ToyModel())
    opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
    cfg = dgc.DGCConfig(density=0.05, min_compress_numel=16, nonfinite="propagate")
    state = dgc.register(ddp, opt, cfg)
    steps_seen, all_nan = [], []
    for step, ((x, y),) in enumerate(_data(rank, steps, 1)):
        opt.zero_grad()
        if step == bad and rank == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        nn.functional.mse_loss(ddp(x), y).backward()
        grads = [p.grad for p in ddp.module.parameters()]
        all_nan.append(all(bool(torch.isnan(g).all()) for g in grads))
        if not all_nan[-1]:
            opt.step()
        steps_seen.append(state.step)
    return {"steps": steps_seen, "all_nan": all_nan}
