"""Worker functions for the multi-process DDP hook tests (run in spawned gloo processes)."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc


class ToyModel(nn.Module):
    """The PyTorch DDP tutorial's ToyModel."""

    def __init__(self) -> None:
        super().__init__()
        self.net1 = nn.Linear(10, 64)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(self.relu(self.net1(x)))


class ConvNet(nn.Module):
    """Conv + linear layers of several shapes; with a tiny bucket cap DDP makes many buckets."""

    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)
        self.extra = nn.Linear(64, 64) if unused else None  # unused: never, or only while use_extra
        self.use_extra = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        x = torch.max_pool2d(torch.relu(self.bn(self.c3(x))), 2)
        h = torch.relu(self.fc1(x.flatten(1)))
        if self.extra is not None and self.use_extra:
            h = h + self.extra(h)
        return self.fc2(h)


@dataclass(kw_only=True)
class Scenario:
    model: str = "toy"
    dgc: dict | None = field(default_factory=dict)  # None = plain DDP
    opt: str = "dgcsgd"  # or "sgd", "sgd_momentum", "sgd_wd"
    steps: int = 6
    lr: float = 0.05
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    static_graph: bool = False
    find_unused: bool = False
    accumulate: int = 1  # micro-batches per step, the first ones under no_sync()
    dtype: str = "float32"
    nan_at: tuple[int, int] | None = None  # (step, rank) whose local gradient gets a NaN
    nan_param: str | None = None  # only this parameter's gradient (default: the input, so all of them)
    extra_until: int | None = None  # find_unused: ConvNet.extra is used (on every rank) before this step only
    check_invariant: bool = True
    checkpoint_at: int | None = None  # save state at this step, rebuild everything, load, continue
    plain_hook: bool = False  # ddp.register_comm_hook(DGCState(...), ddp_comm_hook) instead of dgc.register
    switch: tuple[str, ...] | None = None  # the policy ("sparse"/"dense") of each step, switched mid-run


def _model(name: str, unused: bool) -> nn.Module:
    torch.manual_seed(0)
    return ToyModel() if name == "toy" else ConvNet(unused)


def _batch(model: str, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if model == "toy":
        x, y = torch.randn(8, 10, generator=gen), torch.randn(8, 5, generator=gen)
    else:
        x, y = torch.randn(4, 3, 16, 16, generator=gen), torch.randn(4, 10, generator=gen)
    return x.to(dtype), y.to(dtype)


def _optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "dgcsgd":
        return dgc.DGCSGD(params, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if kind == "sgd_momentum_wd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.01)
    raise ValueError(kind)


def _setup(sc: Scenario, dtype: torch.dtype):
    module = _model(sc.model, sc.find_unused).to(dtype)
    ddp = DDP(
        module,
        bucket_cap_mb=sc.bucket_cap_mb,
        gradient_as_bucket_view=sc.gradient_as_bucket_view,
        static_graph=sc.static_graph,
        find_unused_parameters=sc.find_unused,
    )
    opt = _optimizer(sc.opt, ddp.parameters(), sc.lr)
    if sc.dgc is None:
        state = None
    elif sc.plain_hook:  # the contract's one line, without dgc.register's checks
        state = dgc.DGCState(dgc.DGCConfig(**sc.dgc), module.named_parameters())
        ddp.register_comm_hook(state, dgc.ddp_comm_hook)
    else:
        state = dgc.register(ddp, opt, dgc.DGCConfig(**sc.dgc))
    return module, ddp, opt, state


def _reload(sc: Scenario, dtype: torch.dtype, module: nn.Module, opt, state):
    """Checkpoint everything through torch.save/load, rebuild from scratch and load it back."""
    buf = io.BytesIO()
    torch.save({"model": module.state_dict(), "opt": opt.state_dict(), "dgc": state.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    module, ddp, opt, state = _setup(sc, dtype)
    module.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    state.load_state_dict(ckpt["dgc"])
    return module, ddp, opt, state


def _local_grads(sc: Scenario, module: nn.Module, ref: nn.Module, batches, wd: float) -> dict:
    """This rank's local gradient, from an identical non-DDP copy."""
    ref.load_state_dict(module.state_dict())
    ref.zero_grad()
    for x, y in batches:
        nn.functional.mse_loss(ref(x), y).backward()
    local = {n: p.grad.detach().float().clone() for n, p in ref.named_parameters() if p.grad is not None}
    if sc.find_unused:
        for n, p in ref.named_parameters():
            local.setdefault(n, torch.zeros_like(p, dtype=torch.float32))
    if wd:
        for n, p in module.named_parameters():
            local[n] += wd * p.detach().float()
    return local


def _backward(sc: Scenario, step: int, rank: int, module: nn.Module, ddp: DDP, batches) -> str | None:
    """The micro-batches of one step through DDP (all but the last under no_sync()); a NaN where the
    scenario puts one.  Returns the error backward() raised, if any."""
    try:
        for i, (x, y) in enumerate(batches):
            if i < len(batches) - 1:
                with ddp.no_sync():
                    nn.functional.mse_loss(ddp(x), y).backward()
                continue
            poison = None
            if sc.nan_at == (step, rank) and sc.nan_param is None:
                x = x.clone()
                x[0, 0] = float("nan")
            elif sc.nan_at == (step, rank):
                target = dict(module.named_parameters())[sc.nan_param]
                poison = target.register_hook(lambda g: g * float("nan"))
            try:
                nn.functional.mse_loss(ddp(x), y).backward()
            finally:
                if poison is not None:
                    poison.remove()
    except Exception as exc:  # noqa: BLE001 - recorded and checked by the test
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass(kw_only=True)
class _Ledger:
    """The invariant's running sums: everything corrected (u) and everything sent, per parameter."""

    sum_u: dict
    sum_sent: dict
    max_err: float = 0.0


def _check_invariant(sc: Scenario, step: int, rank: int, world: int, state, names, local, u_prev,
                     grads, failed, book: _Ledger) -> None:
    m, nesterov = state.config.momentum, state.config.nesterov
    nan_here = set()
    if sc.nan_at == (step, rank):  # the buckets with a non-finite gradient
        nan_here = set(names) if sc.nan_param is None else {  # this step's buckets, not step 0's
            n for group in state.codec.groups_at(state.stats.density)
            if sc.nan_param in group for n in group
        }
    for n in names:
        g = local[n]
        if n in nan_here:  # a non-finite local gradient never enters the state
            corrected = torch.zeros_like(g)
        elif m:
            corrected = m * (u_prev[n] + g) + g if nesterov else m * u_prev[n] + g
        else:
            corrected = g.clone()
        dist.all_reduce(corrected)
        book.sum_u[n] += corrected / world
        if failed is None and n in grads:  # globally unused parameters get no gradient
            book.sum_sent[n] += grads[n]
        v = state.memory[n].residual.view(state.memory[n].shape).clone()
        dist.all_reduce(v)
        err = (book.sum_sent[n] + v / world - book.sum_u[n]).abs().max().item()
        scale = book.sum_u[n].abs().max().item() + 1e-6
        book.max_err = max(book.max_err, err / scale)


def run_scenario(rank: int, world: int, sc: Scenario) -> dict:
    """Train ``sc.steps`` steps; check the conservation invariant at every step when asked.

    Returns final parameters, per-step averaged gradients, the last stats and any error message.
    """
    dtype = getattr(torch, sc.dtype)
    module, ddp, opt, state = _setup(sc, dtype)
    ref = copy.deepcopy(module)  # computes this rank's *local* gradient for the invariant
    gen = torch.Generator().manual_seed(1000 + rank)
    names = [n for n, _ in module.named_parameters()]
    wd = 0.0 if state is None else state.config.weight_decay
    book = _Ledger(sum_u={n: torch.zeros_like(p, dtype=torch.float32) for n, p in module.named_parameters()},
                   sum_sent={n: torch.zeros_like(p, dtype=torch.float32) for n, p in module.named_parameters()})
    errors, grads_log, stats = [], [], []
    for step in range(sc.steps):
        if sc.checkpoint_at is not None and step == sc.checkpoint_at:
            module, ddp, opt, state = _reload(sc, dtype, module, opt, state)
        batches = [_batch(sc.model, gen, dtype) for _ in range(sc.accumulate)]
        if sc.extra_until is not None:
            module.use_extra = ref.use_extra = step < sc.extra_until
        local = _local_grads(sc, module, ref, batches, wd)
        if sc.switch is not None:
            state.policy.mode = sc.switch[step]
        u_prev = {}
        if state is not None and state.memory[names[0]].momentum is not None:
            u_prev = {n: state.memory[n].momentum.view(state.memory[n].shape).clone() for n in names}
        opt.zero_grad()
        failed = _backward(sc, step, rank, module, ddp, batches)
        grads = {n: p.grad.detach().float().clone() for n, p in module.named_parameters() if p.grad is not None}
        if failed is None and not all(bool(torch.isfinite(g).all()) for g in grads.values()):
            failed = "propagated"
        if failed is None:
            opt.step()  # before the check: it gives back what parameters without a gradient were sent
        if sc.check_invariant and state is not None:
            _check_invariant(sc, step, rank, world, state, names, local, u_prev, grads, failed, book)
        grads_log.append(grads)
        if state is not None:
            stats.append(state.stats.to_dict())
        if failed is not None:
            errors.append(failed)
            if failed != "propagated":
                break  # DDP's reducer is not reusable after an exception inside backward
    return {
        "params": {n: p.detach().float().clone() for n, p in module.named_parameters()},
        "grads": grads_log,
        "max_rel_err": book.max_err,
        "errors": errors,
        "stats": stats,
        "residual_finite": state is None
        or all(bool(torch.isfinite(mem.residual).all()) for mem in state.memory.values()),
    }


def run_pruned_traffic(rank: int, world: int, steps: int) -> dict:
    """DDP + DGC with pruning masks on a compressed and on a dense-path weight: what each step sends
    and what arrives at the pruned coordinates (see tests/test_pruned_traffic.py)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 5))  # 640 / 320 weights
    ddp = DDP(module)
    opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
    cfg = dgc.DGCConfig(density=0.05, min_compress_numel=400, dense_steps=2)  # 0.weight sparse, 2.weight dense
    state = dgc.register(ddp, opt, cfg)
    gen = torch.Generator().manual_seed(123)  # the same masks on every rank
    masks = {"0.weight": torch.rand(64, 10, generator=gen) < 0.5, "2.weight": torch.rand(5, 64, generator=gen) < 0.3}
    state.set_masks(masks)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    data = torch.Generator().manual_seed(rank)
    out: dict = {"stats": [], "grad_at_pruned": [], "state_at_pruned": [], "first_grad": None, "first_want": None}
    for step in range(steps):
        x, y = torch.randn(16, 10, generator=data), torch.randn(16, 5, generator=data)
        opt.zero_grad()
        local = torch.autograd.grad(nn.functional.mse_loss(module(x), y), list(module.parameters()))
        nn.functional.mse_loss(ddp(x), y).backward()
        grads = dict((n, p.grad.clone()) for n, p in module.named_parameters())
        if step == 0:  # dense step, u = g: the average of the masked local gradients
            want = {}
            for (n, _), g in zip(module.named_parameters(), local, strict=True):
                g = g * masks[n] if n in masks else g.clone()
                dist.all_reduce(g)
                want[n] = g / world
            out["first_grad"], out["first_want"] = grads, want
        opt.step()
        out["stats"].append(state.stats.to_dict())
        out["grad_at_pruned"].append(max(grads[n][~m].abs().max().item() for n, m in masks.items()))
        out["state_at_pruned"].append(max(
            max(state.memory[n].residual[~m.reshape(-1)].abs().max().item(),
                state.memory[n].momentum[~m.reshape(-1)].abs().max().item())
            for n, m in masks.items()
        ))  # fmt: skip
    out["live"] = {n: int(m.sum()) for n, m in masks.items()}
    out["numel"] = {n: p.numel() for n, p in module.named_parameters()}
    out["params"] = {n: p.detach().clone() for n, p in module.named_parameters()}
    return out
