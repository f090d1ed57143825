"""Horovod worker for tests/test_horovod.py: ``horovodrun --gloo -np 2 python worker.py SCENARIO OUT``.

Every rank runs the scenario; rank 0 writes a JSON of measured figures to OUT, which the test checks.
Scenarios:

* ``dense``: DGC with density 1 and momentum 0 against ``hvd.DistributedOptimizer`` (same data);
* ``invariant``: the conservation invariant at every step, ``synchronize()``/``skip_synchronize()``
  against ``synchronize()`` then a plain ``step()``, the ``zero_grad()`` error, a checkpoint round
  trip in the middle of training, which collectives are in flight after ``backward()``, one grouped
  allreduce per dtype for the small tensors, and the "too many backward passes" error;
* ``nonfinite``: a NaN on one rank raises on every rank (or propagates), nothing hangs;
* ``ddp``: the Horovod path against the DDP hook (``torch.distributed`` gloo, in the same processes)
  with the same seeds and data; ``ddp_accumulate`` does it with 2 micro-batches per step
  (``backward_passes_per_step=2`` against DDP's ``no_sync()``).
"""

from __future__ import annotations

import io
import os
import sys
import warnings

import horovod.torch as hvd
import torch
import torch.distributed as dist
import torch.nn as nn
from hvd_main import run_and_report
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
import dgc.horovod


class Net(nn.Module):
    """Two compressible weights (1024 and 256 elements) and two small biases."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def batches(rank: int, steps: int, micro: int = 1) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(1000 + rank)
    return [
        [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(micro)]
        for _ in range(steps)
    ]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def max_over_ranks(value: float) -> float:
    return float(hvd.allreduce(torch.tensor([value], dtype=torch.float64), op=hvd.Max).item())


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n].float() - b[n].float()).abs().max().item() for n in a)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------- dense
def scenario_dense(steps: int = 5) -> dict:
    """density 1 + momentum 0: DGC is plain averaging, so it must match hvd.DistributedOptimizer.

    Both wrap SGD *with* momentum (momentum 0 in DGC = top-k with error feedback, any optimizer).
    """
    cfg = dgc.DGCConfig(density=1.0, momentum=0.0, sample_ratio=1.0, dense_steps=1, min_compress_numel=128)
    ref, mine = make_model(), make_model()
    ref_opt = hvd.DistributedOptimizer(
        torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), named_parameters=ref.named_parameters()
    )
    dgc_opt = dgc.horovod.DistributedOptimizer(
        torch.optim.SGD(mine.parameters(), lr=0.1, momentum=0.9), mine.named_parameters(), config=cfg
    )
    data = batches(hvd.rank(), steps)
    per_step, sparse_steps = [], 0
    for step in range(steps):
        (x, y), = data[step]
        for model, opt in ((ref, ref_opt), (mine, dgc_opt)):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
        sparse_steps += dgc_opt.dgc_state.stats.sparse_buckets > 0
        per_step.append(max_over_ranks(max_diff(params_of(ref), params_of(mine))))
    moved = max_over_ranks(max_diff(params_of(make_model()), params_of(mine)))
    return {"max_diff_per_step": per_step, "moved": moved, "sparse_steps": sparse_steps}


# ------------------------------------------------------------------------------------------ invariant
class CollectiveLog:
    """Counts the async Horovod collectives dgc.horovod launches (it calls them as ``hvd.<fn>``)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._saved = {}

    def start(self) -> CollectiveLog:
        for fn in ("allreduce_async_", "allgather_async"):
            orig = getattr(hvd, fn)
            self._saved[fn] = orig

            def wrapped(tensor, *args, _fn=fn, _orig=orig, **kwargs):  # noqa: ANN001, ANN202
                self.calls.append(
                    {"fn": _fn, "name": kwargs.get("name"), "dtype": str(tensor.dtype), "numel": tensor.numel()}
                )
                return _orig(tensor, *args, **kwargs)

            setattr(hvd, fn, wrapped)
        return self

    def stop(self) -> None:
        for fn, orig in self._saved.items():
            setattr(hvd, fn, orig)

    def take(self) -> list[dict]:
        calls, self.calls = self.calls, []
        return calls


def in_flight(opt: torch.optim.Optimizer) -> dict[str, list[str]]:
    """What the optimizer has launched per parameter (its handle bookkeeping): ``allgather`` and
    ``allreduce`` are collectives already submitted to Horovod, ``grouped`` waits for synchronize()."""
    kinds: dict[str, list[str]] = {"allgather": [], "allreduce": [], "grouped": [], "other": []}
    for p, entry in opt._handles.items():
        name = opt._names[p]
        if isinstance(entry, dgc.horovod_optimizer._Flight) and isinstance(entry.handle, int):
            kinds[entry.kind].append(name)
        elif entry == dgc.horovod_optimizer._GROUPED:
            kinds["grouped"].append(name)
        else:
            kinds["other"].append(name)
    return {k: sorted(v) for k, v in kinds.items()}


class Mixed(nn.Module):
    """One compressible float32 weight, a float32 bias and two float64 vectors (small tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 64)
        self.scale = nn.Parameter(torch.ones(64, dtype=torch.float64))
        self.shift = nn.Parameter(torch.zeros(64, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fc(x).double() * self.scale + self.shift).float()


def _mixed_dtype_groups(log: CollectiveLog, steps: int = 3) -> list[list[dict]]:
    """Small tensors of two dtypes: one grouped allreduce per dtype per step, nothing else dense."""
    torch.manual_seed(0)
    model = Mixed()
    cfg = dgc.DGCConfig(density=0.05, momentum=0.9, dense_steps=1, min_compress_numel=128)
    opt = dgc.horovod.DistributedOptimizer(dgc.DGCSGD(model.parameters(), lr=0.1), model.named_parameters(), config=cfg)
    per_step = []
    log.take()
    for (x, _), in batches(hvd.rank(), steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        per_step.append(log.take())
    return per_step


def _too_many_backward() -> str:
    """backward_passes_per_step=2 and a third backward pass before step(): Horovod's error."""
    model = make_model()
    opt = dgc.horovod.DistributedOptimizer(
        dgc.DGCSGD(model.parameters(), lr=0.1), model.named_parameters(),
        config=dgc.DGCConfig(density=0.05, momentum=0.9, min_compress_numel=128), backward_passes_per_step=2,
    )
    (x, y), = batches(hvd.rank(), 1)[0]
    opt.zero_grad()
    message = ""
    for _ in range(3):
        try:
            loss_fn(model, x, y).backward()
        except AssertionError as exc:
            message = str(exc)
    opt.synchronize()  # the two passes' collectives are in flight on every rank: finish them
    return message


def scenario_invariant(steps: int = 7) -> dict:
    """sum over steps of what arrived + mean residual == sum over steps of the mean corrected gradient.

    Alongside: a twin model trained with ``synchronize()`` then a plain ``step()`` (Horovod warns; the
    second synchronize must do nothing) must match this skip_synchronize() path exactly, and the
    collectives dgc.horovod launches are logged per step.
    """
    cfg = dgc.DGCConfig(density=0.05, momentum=0.9, dense_steps=1, min_compress_numel=128)
    model = make_model()
    opt = dgc.horovod.DistributedOptimizer(dgc.DGCSGD(model.parameters(), lr=0.1), model.named_parameters(), config=cfg)
    twin = make_model()
    twin_opt = dgc.horovod.DistributedOptimizer(dgc.DGCSGD(twin.parameters(), lr=0.1), twin.named_parameters(), config=cfg)
    twin_warnings, twin_diff, inflight, collectives = 0, [], [], []
    log = CollectiveLog().start()
    n = hvd.size()
    names = [name for name, _ in model.named_parameters()]
    sum_u = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    sum_sent = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    data = batches(hvd.rank(), steps)
    max_rel_err, zero_grad_error, warned, checkpoint_ok, sparse_steps = 0.0, "", 0, False, 0
    for step in range(steps):
        (x, y), = data[step]
        state = opt.dgc_state
        u_prev = {name: state.memory[name].momentum.view(state.memory[name].shape).clone() for name in names}
        local: dict[str, torch.Tensor] = {}
        hooks = [
            p.register_hook(lambda g, name=name, store=local: store.__setitem__(name, g.detach().clone()))
            for name, p in model.named_parameters()
        ]
        log.take()
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        for h in hooks:
            h.remove()
        inflight.append(in_flight(opt))  # before synchronize(): launched from the gradient hooks
        if step == 2:  # Horovod's error: zero_grad between backward and step
            try:
                opt.zero_grad()
            except AssertionError as exc:
                zero_grad_error = str(exc)
        opt.synchronize()  # p.grad now holds the DGC average
        sparse_steps += state.stats.sparse_buckets > 0
        for name, p in model.named_parameters():
            corrected = cfg.momentum * u_prev[name] + local[name]
            sum_u[name] += hvd.allreduce(corrected, op=hvd.Sum, name=f"u.{name}") / n
            sum_sent[name] += p.grad
            v = state.memory[name].residual.view(p.shape)
            mean_v = hvd.allreduce(v.clone(), op=hvd.Sum, name=f"v.{name}") / n
            err = (sum_sent[name] + mean_v - sum_u[name]).abs().max().item()
            max_rel_err = max(max_rel_err, err / (sum_u[name].abs().max().item() + 1e-6))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with opt.skip_synchronize():
                opt.step()
        warned += len(caught)
        collectives.append([c for c in log.take() if (c["name"] or "").startswith("dgc.")])
        # The twin: synchronize(), then step() without skip_synchronize(): warns, must not re-send.
        twin_opt.zero_grad()
        loss_fn(twin, x, y).backward()
        twin_opt.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            twin_opt.step()
        twin_warnings += sum("skip_synchronize" in str(w.message) for w in caught)
        twin_diff.append(max_over_ranks(max_diff(params_of(model), params_of(twin))))
        if step == 3:  # checkpoint, rebuild model and optimizer, restore, continue with the new ones
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=True)
            old = opt.dgc_state
            model = make_model()
            model.load_state_dict(ckpt["model"])
            opt = dgc.horovod.DistributedOptimizer(
                dgc.DGCSGD(model.parameters(), lr=0.1), model.named_parameters(), config=cfg
            )
            opt.load_state_dict(ckpt["opt"])
            new = opt.dgc_state
            checkpoint_ok = new.step == old.step and all(
                torch.equal(new.memory[k].residual, old.memory[k].residual)
                and torch.equal(new.memory[k].momentum, old.memory[k].momentum)
                for k in names
            )
    sync_steps = [opt.dgc_state.step, twin_opt.dgc_state.step]
    twin_opt.synchronize()  # after step() with no backward (hvd.broadcast_optimizer_state): a real step
    twin_extra = twin_opt.dgc_state.step
    mixed = _mixed_dtype_groups(log)
    log.stop()
    return {
        "sync_then_step": {
            "steps": sync_steps,
            "max_diff_per_step": twin_diff,
            "warnings": twin_warnings,
            "step_after_extra_synchronize": twin_extra,
        },
        "in_flight_after_backward": inflight,
        "compressed": sorted(n for n, m in opt.dgc_state.memory.items() if m.compressed),
        "collectives": collectives,
        "mixed_dtype_collectives": mixed,
        "too_many_backward_error": _too_many_backward(),
        "max_rel_err": max_over_ranks(max_rel_err),
        "zero_grad_error": zero_grad_error,
        "skip_synchronize_warnings": warned,
        "checkpoint_ok": bool(hvd.allreduce(torch.tensor([int(checkpoint_ok)]), op=hvd.Min).item()),
        "sparse_steps": sparse_steps,
        "residual_norm": max_over_ranks(
            sum(m.residual.norm().item() for m in opt.dgc_state.memory.values())
        ),
    }


# ------------------------------------------------------------------------------------------------ ddp
DDP_CONFIG = dict(
    density=0.05,
    momentum=0.9,
    dense_steps=2,
    warmup_steps=2,
    warmup_initial_density=0.25,
    warmup_stages=2,
    weight_decay=1e-3,
    clip_norm=5.0,
    min_compress_numel=128,
)


def _prune(model: nn.Module, state: dgc.DGCState, pruned: bool) -> dict[str, torch.Tensor]:
    """Masks (the same on every rank) on a compressed weight and on a small dense-path bias."""
    if not pruned:
        return {}
    gen = torch.Generator().manual_seed(7)
    masks = {"fc1.weight": torch.rand(64, 16, generator=gen) < 0.4, "fc1.bias": torch.rand(64, generator=gen) < 0.5}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    state.set_masks(masks)
    return masks


def _at_pruned(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    named = dict(model.named_parameters())
    return max((named[n].detach()[~m].abs().max().item() for n, m in masks.items()), default=0.0)


def scenario_ddp(steps: int = 8, micro: int = 1, pruned: bool = False) -> dict:
    """Same seeds, same data, same config: Horovod optimizer vs DDP hook, parameters after each step
    (``pruned``: with pruning masks, whose coordinates neither transport sends)."""
    cfg = dgc.DGCConfig(**DDP_CONFIG)
    data = batches(hvd.rank(), steps, micro)

    # Transport 1: Horovod.
    h_model = make_model()
    h_opt = dgc.horovod.DistributedOptimizer(
        dgc.DGCSGD(h_model.parameters(), lr=0.1), h_model.named_parameters(), config=cfg,
        backward_passes_per_step=micro,
    )
    masks = _prune(h_model, h_opt.dgc_state, pruned)
    h_params, h_sent = [], []
    for step in range(steps):
        h_opt.zero_grad()
        for x, y in data[step]:
            loss_fn(h_model, x, y).backward()
        h_opt.step()
        h_params.append(params_of(h_model))
        h_sent.append(h_opt.dgc_state.stats.elements_sent)

    # Transport 2: DDP with the DGC comm hook, over torch.distributed gloo in the same processes.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{os.environ['DGC_TEST_PORT']}",
        rank=hvd.rank(),
        world_size=hvd.size(),
    )
    try:
        d_model = make_model()
        ddp = DDP(d_model)
        d_opt = dgc.DGCSGD(ddp.parameters(), lr=0.1)
        d_state = dgc.register(ddp, d_opt, cfg)
        _prune(d_model, d_state, pruned)
        per_step, d_sent = [], []
        for step in range(steps):
            d_opt.zero_grad()
            for i, (x, y) in enumerate(data[step]):
                if i < micro - 1:
                    with ddp.no_sync():
                        loss_fn(ddp, x, y).backward()
                else:
                    loss_fn(ddp, x, y).backward()
            d_opt.step()
            per_step.append(max_diff(h_params[step], params_of(d_model)))
            d_sent.append(d_state.stats.elements_sent)
        residual_diff = max(
            (h_opt.dgc_state.memory[k].residual - d_state.memory[k].residual).abs().max().item()
            for k in d_state.memory
        )
        densities = [cfg.density_at(s) for s in range(steps)]
    finally:
        dist.destroy_process_group()
    return {
        "max_diff_per_step": [max_over_ranks(d) for d in per_step],
        "residual_diff": max_over_ranks(residual_diff),
        "moved": max_over_ranks(max_diff(params_of(make_model()), h_params[-1])),
        "steps": [h_opt.dgc_state.step, d_state.step],
        "densities": densities,
        "achieved_density_last": h_opt.dgc_state.stats.achieved_density,
        "elements_sent": [h_sent, d_sent],
        "at_pruned": max_over_ranks(max(_at_pruned(h_model, masks), _at_pruned(d_model, masks))),
        "live": {n: int(m.sum()) for n, m in masks.items()},
    }

# ------------------------------------------------------------------------------------------ nonfinite
def scenario_nonfinite(steps: int = 5) -> dict:
    """A NaN in rank 1's input at a dense step (0) and a sparse step (2): every rank raises from
    step() ("raise") or gets NaN gradients ("propagate"); the residuals stay finite, nothing hangs,
    and training goes on."""
    out: dict = {}
    for mode in ("raise", "propagate"):
        cfg = dgc.DGCConfig(density=0.05, momentum=0.9, dense_steps=1, min_compress_numel=128, nonfinite=mode)
        model = make_model()
        opt = dgc.horovod.DistributedOptimizer(
            dgc.DGCSGD(model.parameters(), lr=0.1), model.named_parameters(), config=cfg
        )
        data = batches(hvd.rank(), steps)
        failures, unchanged = [], True
        for step in range(steps):
            (x, y), = data[step]
            if step in (0, 2) and hvd.rank() == 1:
                x = x.clone()
                x[0, 0] = float("nan")
            before = params_of(model)
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            try:
                opt.synchronize()
            except FloatingPointError:
                failures.append(step)
                unchanged &= max_diff(before, params_of(model)) == 0.0
                continue
            if not all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()):
                failures.append(step)  # what torch.amp.GradScaler would skip
                continue
            with opt.skip_synchronize():
                opt.step()
        out[mode] = {
            "failures": failures,
            "unchanged": unchanged,
            "residual_finite": all(bool(torch.isfinite(m.residual).all()) for m in opt.dgc_state.memory.values()),
            "params_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
            "step": opt.dgc_state.step,
        }
    out["partial"] = _partial_nonfinite()
    return out


def _partial_nonfinite(steps: int = 5, bad_step: int = 3) -> dict:
    """A NaN in ONE tensor's gradient on rank 1 at a sparse step: the others were delivered fine, but
    the step is not applied, so every rank must put what it sent back: afterwards each residual is
    v_before + (m u_before + g) for every finite local gradient, and v_before for the NaN one."""
    cfg = dgc.DGCConfig(density=0.05, momentum=0.9, dense_steps=1, min_compress_numel=128)
    model = make_model()
    opt = dgc.horovod.DistributedOptimizer(dgc.DGCSGD(model.parameters(), lr=0.1), model.named_parameters(), config=cfg)
    state = opt.dgc_state
    data = batches(hvd.rank(), steps)
    grads: dict[str, torch.Tensor] = {}
    poison = dict(model.named_parameters())["fc1.weight"]
    for name, p in model.named_parameters():
        if p is poison:
            p.register_hook(lambda g: g * float("nan") if grads.get("_bad") is not None else g)
        p.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach().float().clone()) or g)
    failures, max_err = [], 0.0
    for step in range(steps):
        (x, y), = data[step]
        if step == bad_step and hvd.rank() == 1:
            grads["_bad"] = torch.ones(())
        before = {n: (m.residual.clone(), m.momentum.clone()) for n, m in state.memory.items()}
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        try:
            opt.synchronize()
        except FloatingPointError:
            failures.append(step)
            for n, (v0, u0) in before.items():
                g = grads[n].reshape(-1)
                want = v0 if not bool(torch.isfinite(g).all()) else v0 + cfg.momentum * u0 + g
                err = (state.memory[n].residual - want).abs().max().item() / (want.abs().max().item() + 1e-6)
                max_err = max(max_err, err)
            grads.pop("_bad", None)
            continue
        with opt.skip_synchronize():
            opt.step()
    return {"failures": failures, "max_rel_err": max_over_ranks(max_err), "step": state.step}


SCENARIOS = {
    "dense": scenario_dense,
    "invariant": scenario_invariant,
    "nonfinite": scenario_nonfinite,
    "ddp": scenario_ddp,
    "ddp_accumulate": lambda: scenario_ddp(steps=6, micro=2),
    "ddp_pruned": lambda: scenario_ddp(steps=6, pruned=True),
}


def main() -> None:
    run_and_report(SCENARIOS[sys.argv[1]], sys.argv[2])


if __name__ == "__main__":
    main()
