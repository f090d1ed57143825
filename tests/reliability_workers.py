"""Workers of tests/test_reliability_ddp.py (spawned gloo processes): misuse and faults on the DDP hook."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from ddp_workers import ToyModel
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
from dgc.hierarchy_dist import TorchNodeTopology

NODES = [[0, 1], [2, 3]]


class BigLinear(nn.Module):
    """ToyModel's shape with a 512-wide hidden layer: weights of 5120 and 2560 elements, which the node
    hierarchy splits between the two local ranks of a node (pieces of at least 1024 elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.net1 = nn.Linear(10, 512)
        self.net2 = nn.Linear(512, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(torch.relu(self.net1(x)))


MODELS = {"toy": ToyModel, "big": BigLinear}


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


def _pieces(state: dgc.DGCState) -> list[str]:
    """Pieces of split tensors in the layouts the codec made."""
    return sorted({n for key in state.codec._layouts for n in key[0] if state.piece_of(n)})


def hierarchy(rank: int, world: int, cfg: dict, steps: int = 4, model: str = "toy",
              nodes: list[list[int]] | None = None) -> dict:
    """The same training flat and with hierarchy="node" (simulated ``nodes``; default 2 nodes of 2)."""
    out = {}
    for mode in ("flat", "node"):
        torch.manual_seed(0)
        ddp = DDP(MODELS[model](), bucket_cap_mb=0.001)  # a bucket per tensor
        opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
        config = dgc.DGCConfig(**cfg, hierarchy=mode)
        state = dgc.register(ddp, opt, config, node_groups=(nodes or NODES) if mode == "node" else None)
        received = 0
        for (x, y), in _data(rank, steps, 1):
            opt.zero_grad()
            nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
            received += state.stats.bytes_received
        out[mode] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
        out[mode + "_received"] = received
        out[mode + "_sparse"] = state.stats.sparse_buckets
        out[mode + "_pieces"] = _pieces(state)
    return out


def _node_sums(state: dgc.DGCState, topo: TorchNodeTopology) -> dict[str, torch.Tensor]:
    """Per parameter, u and v (concatenated) summed over this rank's node."""
    out = {}
    for name, mem in state.memory.items():
        t = torch.cat([mem.momentum, mem.residual])
        dist.all_reduce(t, group=topo.intra)
        out[name] = t
    return out


def _foreign_state(state: dgc.DGCState, topo: TorchNodeTopology) -> float:
    """The largest |u| or |v| this rank holds outside the ranges it owns (0: each element at its owner)."""
    worst = 0.0
    for name, ranges in topo.owner_of.items():
        mem = state.memory[name]
        for a, b, owner in ranges:
            if owner != topo.local_rank:
                worst = max(worst, mem.residual[a:b].abs().max().item(), mem.momentum[a:b].abs().max().item())
    return worst


def hierarchy_resume(rank: int, world: int, steps: int = 3) -> dict:
    """hierarchy="node": train with a bucket per tensor, save; resume with one bucket (another cut):
    the placement of the loaded state keeps u and v summed over each node exactly, each element at
    its new owner only; then training goes on (the hook places the state by its own cut again)."""
    cfg = dgc.DGCConfig(density=0.05, min_compress_numel=16, dense_steps=1, hierarchy="node")
    torch.manual_seed(0)
    ddp = DDP(BigLinear(), bucket_cap_mb=0.001)
    opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
    state = dgc.register(ddp, opt, cfg, node_groups=NODES)
    batches = _data(rank, steps + 1, 1)
    for (x, y), in batches[:steps]:
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    topo = TorchNodeTopology.build(state, NODES)
    before = _node_sums(state, topo)
    saved, cut_before = state.state_dict(), dict(state.transport.topology(state).owner_of)

    ddp2 = DDP(BigLinear(), bucket_cap_mb=25)  # one bucket: cut elsewhere
    ddp2.module.load_state_dict(ddp.module.state_dict())
    opt2 = dgc.DGCSGD(ddp2.parameters(), lr=0.05)
    state2 = dgc.register(ddp2, opt2, cfg, node_groups=NODES)
    state2.load_state_dict(saved)
    topo2 = TorchNodeTopology.build(state2, NODES)
    bucket = tuple(reversed([n for n, _ in ddp2.module.named_parameters()]))
    topo2.shares(state2, state2.codec.layout(bucket))
    after = _node_sums(state2, topo2)
    foreign = _foreign_state(state2, topo2)
    (x, y), = batches[steps]
    opt2.zero_grad()
    nn.functional.mse_loss(ddp2(x), y).backward()
    opt2.step()
    return {
        "exact": all(torch.equal(before[n], after[n]) for n in before),
        "held": sum(t.abs().sum().item() for t in before.values()),
        "cut_changed": cut_before != topo2.owner_of,
        "foreign": foreign,
        "foreign_after_step": _foreign_state(state2, state2.transport.topology(state2)),
        "params": {n: p.detach().clone() for n, p in ddp2.module.named_parameters()},
        "step": state2.step,
    }


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


def _snapshot(state: dgc.DGCState) -> dict[str, torch.Tensor]:
    return {name: mem.residual.clone() for name, mem in state.memory.items()}


def _settled(state: dgc.DGCState, topo: TorchNodeTopology, before: dict[str, torch.Tensor],
             local: dict[str, torch.Tensor]) -> list[tuple[str, int, int, str]]:
    """Per range this rank owns after a failed step (momentum 0): "restored" when v gained the node
    average of the local gradients there (what was sent is back), "untouched" when v is bit-for-bit as
    before, else "other"."""
    out = []
    for name, ranges in sorted(topo.owner_of.items()):
        avg = local[name].clone()
        dist.all_reduce(avg, group=topo.intra)
        avg /= topo.local_size
        v = state.memory[name].residual
        for a, b, owner in ranges:
            if owner != topo.local_rank:
                continue
            gained = v[a:b] - before[name][a:b]
            if torch.isfinite(avg[a:b]).all() and torch.allclose(gained, avg[a:b], rtol=1e-5, atol=1e-6):
                out.append((name, a, b, "restored"))
            else:
                out.append((name, a, b, "untouched" if torch.equal(v[a:b], before[name][a:b]) else "other"))
    return out


def node_nan(rank: int, world: int, cfg: dict, bad: dict[int, str], steps: int = 6) -> dict:
    """hierarchy="node" (nodes [0, 1], [2, 3]), nonfinite="propagate", momentum 0: at step s of ``bad``,
    rank 1's local gradient of net1.weight (split between the two local ranks) gets a NaN in the piece
    that rank 1 owns (``"owned"``) or in the piece that rank 0 owns (``"foreign"``).  Per step: whether
    every gradient came out NaN and the step count; per failed step, how each range this rank owns
    settled (:func:`_settled`) and whether every u and v stayed finite."""
    torch.manual_seed(0)
    ddp = DDP(BigLinear(), bucket_cap_mb=0.001)
    opt = dgc.DGCSGD(ddp.parameters(), lr=0.05)
    config = dgc.DGCConfig(**cfg, momentum=0.0, nonfinite="propagate", hierarchy="node")
    state = dgc.register(ddp, opt, config, node_groups=NODES)
    local: dict[str, torch.Tensor] = {}
    poison: list[int] = []

    def capture(name: str):  # noqa: ANN202
        def hook(g: torch.Tensor) -> torch.Tensor:
            if poison and name == "net1.weight":
                g = g.clone()
                g.view(-1)[poison[0]] = float("nan")
            local[name] = g.detach().reshape(-1).clone()
            return g
        return hook

    for name, p in ddp.module.named_parameters():
        p.register_hook(capture(name))
    out: dict = {"all_nan": [], "steps": [], "settled": {}, "state_finite": {}, "nan_at": {}}
    for step, ((x, y),) in enumerate(_data(rank, steps, 1)):
        opt.zero_grad()
        poison.clear()
        if step in bad:
            ranges = state.transport.topology(state).owner_of["net1.weight"]
            want = 1 if bad[step] == "owned" else 0
            a, b = next((a, b) for a, b, owner in ranges if owner == want)
            out["nan_at"][step] = ((a + b) // 2, (a, b))
            if rank == 1:
                poison.append((a + b) // 2)
        before = _snapshot(state)
        nn.functional.mse_loss(ddp(x), y).backward()
        grads = [p.grad for p in ddp.module.parameters()]
        out["all_nan"].append(all(bool(torch.isnan(g).all()) for g in grads))
        if step in bad:
            out["settled"][step] = _settled(state, state.transport.topology(state), before, local)
            out["state_finite"][step] = all(bool(torch.isfinite(m.residual).all()) for m in state.memory.values())
        else:
            opt.step()
        out["steps"].append(state.step)
    out["params"] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    return out
