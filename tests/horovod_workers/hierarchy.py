"""Horovod worker for tests/test_horovod_hierarchy.py: ``horovodrun --gloo -np 4 python hierarchy.py
SCENARIO OUT``, 2 simulated nodes of 2 processes on one host (``node_groups=[[0, 1], [2, 3]]``).

Every rank runs the scenario; rank 0 writes a JSON of measured figures to OUT.  Scenarios:

* ``equal``: ``hierarchy="node"`` against flat Horovod DGC, same seeds and data, at density 1 (momentum
  0, and momentum 0.9 without momentum masking) and with ``policy="dense"`` (momentum-corrected dense);
  and at density 0.01 the bytes each rank receives and hands across the nodes, node against flat;
* ``invariant``: the conservation invariant per share at every step (density 0.05), state held by one
  local rank per node, the checkpoint layout check, node layouts that are refused, and the nodes found
  from Horovod's own ``local_rank``/``cross_rank`` (one host: one node of 4);
* ``static_sets``: node process sets passed to ``hvd.init(process_sets=[...])`` are found and used;
  nodes whose process set is not registered are refused with the way out; ``policy="auto"`` on the node
  hierarchy decides alike on every rank, from this rank's share.
"""

from __future__ import annotations

import horovod.torch as hvd
import torch
import torch.nn as nn
from hvd_main import main_with_node_sets
from worker import loss_fn, max_over_ranks  # this file's folder is on sys.path (run as a script)

import dgc
import dgc.horovod

NODES = [[0, 1], [2, 3]]


class Net(nn.Module):
    """Three compressible weights (8192, 16384 and 256 elements) and three biases."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 256)
        self.fc2 = nn.Linear(256, 64)
        self.fc3 = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000 + hvd.rank())
    return [(torch.randn(8, 32, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(steps)]


def optimizer(model: nn.Module, cfg: dgc.DGCConfig, nodes: list[list[int]] | None = NODES):
    return dgc.horovod.DistributedOptimizer(
        dgc.DGCSGD(model.parameters(), lr=0.1), model.named_parameters(), config=cfg,
        node_groups=nodes if cfg.hierarchy == "node" else None,
    )


def split_tensors(opt) -> list[str]:  # noqa: ANN001
    """The pieces of the node buckets' shares (tensors cut between local ranks); [] for flat."""
    nodes = getattr(opt, "_nodes", None)
    if nodes is None:
        return []
    state = opt.dgc_state
    return sorted({n for b in nodes.buckets for s in b.shares for n in s.names if state.piece_of(n)})


def train(cfg: dgc.DGCConfig, steps: int) -> dict:
    """Train the net for ``steps``; the parameters after every step, over the sparse steps the bytes
    received and those handed across the nodes (node: the topology's ``sent_across``; flat: every byte
    a rank sends goes to the N - 1 others, (N - 1) x ``bytes_sent``), sparse steps, the pieces of split
    tensors."""
    model = make_model()
    opt = optimizer(model, cfg)
    params, received, sent, sparse = [], 0, 0, 0
    for x, y in batches(steps):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
        if opt.dgc_state.stats.sparse_buckets > 0:  # the dense steps reduce whole buckets either way
            received += opt.dgc_state.stats.bytes_received
            sent += opt.dgc_state.stats.bytes_sent
            sparse += 1
    nodes = getattr(opt, "_nodes", None)
    across = (hvd.size() - 1) * sent if nodes is None else nodes.topo.sent_across
    return {"params": params, "received": received, "across": across, "sparse_steps": sparse,
            "pieces": split_tensors(opt)}


def _spread(t: torch.Tensor) -> float:
    """How far ranks' copies of ``t`` differ (0: identical everywhere)."""
    hi = hvd.allreduce(t.double(), op=hvd.Max)
    lo = hvd.allreduce(t.double(), op=hvd.Min)
    return float((hi - lo).abs().max())


# ---------------------------------------------------------------------------------------------- equal
EQUAL_CONFIGS = {
    "density1": dict(density=1.0, momentum=0.0, sample_ratio=1.0, dense_steps=1, min_compress_numel=128),
    "density1_momentum": dict(density=1.0, momentum=0.9, momentum_masking=False, sample_ratio=1.0,
                              dense_steps=1, min_compress_numel=128),
    "dense_policy": dict(momentum=0.9, min_compress_numel=128, policy="dense"),
}


def scenario_equal(steps: int = 5) -> dict:
    out: dict = {}
    for key, kw in EQUAL_CONFIGS.items():
        flat = train(dgc.DGCConfig(**kw, hierarchy="flat"), steps)
        node = train(dgc.DGCConfig(**kw, hierarchy="node"), steps)
        diff = [max((a[n] - b[n]).abs().max().item() for n in a) for a, b in zip(flat["params"], node["params"])]
        out[key] = {
            "max_diff_per_step": [max_over_ranks(d) for d in diff],
            "moved": max_over_ranks(max((node["params"][-1][n] - p).abs().max().item()
                                        for n, p in make_model().named_parameters())),
            "node_sparse_steps": node["sparse_steps"],
            "flat_sparse_steps": flat["sparse_steps"],
            "spread": max(_spread(p) for p in node["params"][-1].values()),
            "pieces": node["pieces"],
        }
    sparse = dict(density=0.01, momentum=0.9, dense_steps=1, min_compress_numel=128)
    flat = train(dgc.DGCConfig(**sparse, hierarchy="flat"), steps)
    node = train(dgc.DGCConfig(**sparse, hierarchy="node"), steps)
    out["received"] = {"flat": flat["received"], "node": node["received"], "node_sparse_steps": node["sparse_steps"],
                       "flat_across": flat["across"], "node_across": node["across"]}
    return out


# ------------------------------------------------------------------------------------------ invariant
def _conservation(steps: int = 6) -> dict:
    """sum of what arrived + mean over nodes of the owners' residuals == sum of the mean over nodes of
    the owners' momentum-corrected node-averaged gradients, per tensor, at every step.  Non-owners hold
    zero state, so per rank: x = m u_prev + g / L summed over all ranks and divided by the nodes."""
    cfg = dgc.DGCConfig(density=0.05, momentum=0.9, dense_steps=1, min_compress_numel=128, hierarchy="node")
    model = make_model()
    opt = optimizer(model, cfg)
    state = opt.dgc_state
    n_nodes, local = len(NODES), len(NODES[0])
    local_grads: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: local_grads.__setitem__(name, g.detach().clone()))
    sum_x = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    sum_sent = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    max_rel_err, owners_ok, sparse = 0.0, True, 0
    for x, y in batches(steps):
        u_prev = {n: m.momentum.view(m.shape).clone() for n, m in state.memory.items()}
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.synchronize()
        sparse += state.stats.sparse_buckets > 0
        for name, p in model.named_parameters():
            mine = cfg.momentum * u_prev[name] + local_grads[name] / local
            sum_x[name] += hvd.allreduce(mine, op=hvd.Sum, name=f"x.{name}") / n_nodes
            sum_sent[name] += p.grad
            v = state.memory[name].residual.view(p.shape)
            mean_v = hvd.allreduce(v.clone(), op=hvd.Sum, name=f"v.{name}") / n_nodes
            err = (sum_sent[name] + mean_v - sum_x[name]).abs().max().item()
            max_rel_err = max(max_rel_err, err / (sum_x[name].abs().max().item() + 1e-6))
            # One owner per element: at most one local rank of each node holds state for each element
            # (a split tensor's pieces sit at different local ranks).
            holds = ((v.reshape(-1) != 0) | (state.memory[name].momentum != 0)).float().reshape(1, -1)
            per_rank = hvd.allgather(holds, name=f"holds.{name}")
            owners_ok &= all(bool(per_rank[g].sum(dim=0).le(1).all()) for g in NODES)
        with opt.skip_synchronize():
            opt.step()
    return {
        "max_rel_err": max_over_ranks(max_rel_err),
        "owners_ok": bool(hvd.allreduce(torch.tensor([int(owners_ok)]), op=hvd.Min).item()),
        "sparse_steps": sparse,
        "residual_norm": max_over_ranks(sum(m.residual.norm().item() for m in state.memory.values())),
        "checkpoint_error": _checkpoint_error(opt),
        "pieces": split_tensors(opt),
    }


def _checkpoint_error(node_opt: torch.optim.Optimizer) -> str:
    """A node checkpoint loaded into a flat run is refused (the layouts differ)."""
    saved = node_opt.state_dict()
    model = make_model()
    flat = optimizer(model, dgc.DGCConfig(density=0.05, momentum=0.9, dense_steps=1, min_compress_numel=128))
    try:
        flat.load_state_dict(saved)
    except ValueError as exc:
        return str(exc)
    return ""


def _refused(nodes: list[list[int]]) -> str:
    cfg = dgc.DGCConfig(density=0.05, min_compress_numel=128, hierarchy="node")
    try:
        optimizer(make_model(), cfg, nodes)
    except ValueError as exc:
        return str(exc)
    return ""


def scenario_invariant() -> dict:
    out = _conservation()
    out["unequal_nodes"] = _refused([[0, 1, 2], [3]])
    out["rank_twice"] = _refused([[0, 1], [1, 2, 3]])
    found = optimizer(make_model(), dgc.DGCConfig(min_compress_numel=128, hierarchy="node"), None)
    out["found_nodes"] = found.dgc_state.node_groups  # horovodrun on one host: one node of 4
    return out


# ---------------------------------------------------------------------------------------- static_sets
def _auto_decisions(steps: int = 5) -> dict:
    """policy="auto" with hierarchy="node": decided every step, alike on every rank, and predicted from
    this rank's share (the policy holds the node topology)."""
    cfg = dgc.DGCConfig(density=0.05, momentum=0.9, dense_steps=1, min_compress_numel=128,
                        hierarchy="node", policy="auto", policy_interval=1)
    model = make_model()
    opt = optimizer(model, cfg)
    state = opt.dgc_state
    decisions = []
    for x, y in batches(steps):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        decisions.append(sorted((repr(k), bool(v)) for k, v in state.policy.decisions.items()))
    everyone = hvd.allgather_object(decisions)
    return {
        "auto_same_everywhere": all(d == everyone[0] for d in everyone),
        "auto_decided": sum(len(d) for d in decisions),
        "auto_topology": state.policy.topology is not None,
        "auto_spread": max(_spread(p.detach()) for p in model.parameters()),
    }


def scenario_static_sets(steps: int = 3) -> dict:
    cfg = dict(density=1.0, momentum=0.0, sample_ratio=1.0, dense_steps=1, min_compress_numel=128)
    flat = train(dgc.DGCConfig(**cfg, hierarchy="flat"), steps)
    node = train(dgc.DGCConfig(**cfg, hierarchy="node"), steps)
    diff = max((flat["params"][-1][n] - p).abs().max().item() for n, p in node["params"][-1].items())
    return {
        "max_diff": max_over_ranks(diff),
        "node_sparse_steps": node["sparse_steps"],
        "missing_sets": _refused([[0, 2], [1, 3]]),  # no process set holds {0, 2}: not dynamic here
        **_auto_decisions(),
    }


SCENARIOS = {"equal": scenario_equal, "invariant": scenario_invariant, "static_sets": scenario_static_sets}


def main() -> None:
    main_with_node_sets(SCENARIOS, "static_sets", NODES)


if __name__ == "__main__":
    main()
