"""Horovod worker for tests/test_quant_horovod.py: ``horovodrun --gloo -np N python quant_worker.py
SCENARIO OUT`` (``single`` runs without horovodrun: one process).

Every rank runs the scenario; rank 0 writes the figures it measured (reduced over ranks where it
says so) to OUT as JSON, which the test checks.  The model is a probe: ``loss = sum(p * t)``, so the
local gradient of each parameter is exactly the tensor ``t`` the rank draws, and the dense average
is known.  Scenarios:

* ``ddp``: the Horovod optimizer against the DDP quant hook (``torch.distributed`` gloo, in the same
  processes) on the same gradients and the same buckets, per step and bit for bit; with
  ``backward_passes_per_step=2`` against DDP's ``no_sync()``; a checkpoint round trip; Horovod's
  ``synchronize()``/``skip_synchronize()``/``zero_grad()`` semantics;
* ``exchange``: the first step against the dense average, nothing lost over ranks, error feedback's
  running sum against the dense sum, and the bytes handed to and received from Horovod, counted;
* ``nonfinite``: a NaN on one rank fails the step on every rank (raise or propagate);
* ``single``: one process: the gradient is used exactly, nothing is kept.
"""

from __future__ import annotations

import io
import math
import os
import sys
import warnings

import horovod.torch as hvd
import torch
import torch.distributed as dist
from hvd_main import run_and_report
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc.quant.horovod as qhvd
from dgc.quant import QuantConfig, QuantState, quant_hook

SHAPES = [(48, 50), (50,), (30, 40), (40,), (4001,)]
"""Three parameters of >= 1024 elements (exchanged alone by default) and two small ones (grouped)."""
NUMEL = sum(math.prod(s) for s in SHAPES)
DETERMINISTIC = {  # the methods' error-feedback defaults: round to nearest, no random draws
    "int8": QuantConfig(method="int8"),
    "terngrad": QuantConfig(method="terngrad"),
    "qsgd": QuantConfig(method="qsgd"),
}


class Probe(nn.Module):
    """Parameters ``ps.0`` .. ``ps.4`` of SHAPES; the loss is the sum of the dot products
    ``<p_i, t_i>``, so the gradient of ``p_i`` is exactly ``t_i``."""

    def __init__(self) -> None:
        super().__init__()
        self.ps = nn.ParameterList(nn.Parameter(torch.zeros(shape)) for shape in SHAPES)

    def forward(self, targets: list[torch.Tensor]) -> torch.Tensor:
        dots = [torch.dot(p.reshape(-1), t.reshape(-1)) for p, t in zip(self.ps, targets, strict=True)]
        return torch.stack(dots).sum()


def targets_of(step: int, rank: int, micro: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100_000 * micro + 1000 * step + rank)
    return [torch.randn(s, generator=g) * (1 + i) for i, s in enumerate(SHAPES)]


def zeros() -> list[torch.Tensor]:
    return [torch.zeros(s) for s in SHAPES]


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def flat_residual(state: QuantState, model: nn.Module) -> torch.Tensor:
    return torch.cat([state.residuals.get(n, torch.zeros(p.numel()))
                      for n, p in model.named_parameters()])


def horovod_optimizer(model: nn.Module, config: QuantConfig, **kwargs) -> torch.optim.Optimizer:
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return qhvd.DistributedOptimizer(sgd, model.named_parameters(), config=config, **kwargs)


def hvd_step(model: nn.Module, opt: torch.optim.Optimizer, batches: list[list[torch.Tensor]]) -> torch.Tensor:
    """``zero_grad``, one backward per micro-batch, ``step()``; the averaged gradient, flat."""
    opt.zero_grad()
    for targets in batches:
        model(targets).backward()
    opt.step()
    return flat_grads(model)


def max_over_ranks(value: float) -> float:
    return float(hvd.allreduce(torch.tensor([value], dtype=torch.float64), op=hvd.Max,
                               name="test.max").item())


def all_ranks(flag: bool) -> bool:
    return bool(hvd.allreduce(torch.tensor([int(flag)]), op=hvd.Min, name="test.all").item())


def sum_over_ranks(t: torch.Tensor, name: str) -> torch.Tensor:
    return hvd.allreduce(t, op=hvd.Sum, name=name)


# ------------------------------------------------------------------------------------------------ ddp
def ddp_run(config: QuantConfig, steps: int, micro: int, bucket_cap_mb: float) -> tuple[list, torch.Tensor]:
    """DDP + the quant hook: one step of zero gradients (so that DDP rebuilds its buckets, in the
    order backward produces the gradients), then ``steps`` steps; the averages and residuals."""
    model = Probe()
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    state = QuantState(config, model.named_parameters())
    ddp.register_comm_hook(state, quant_hook)
    rank, out = dist.get_rank(), []
    for step in range(-1, steps):
        opt.zero_grad()
        for i in range(micro):
            targets = zeros() if step < 0 else targets_of(step, rank, i)
            if i < micro - 1:
                with ddp.no_sync():
                    ddp(targets).backward()
            else:
                ddp(targets).backward()
        opt.step()
        if step >= 0:
            out.append(flat_grads(model))
    return out, flat_residual(state, model)


def hvd_run(config: QuantConfig, steps: int, micro: int, group_below: int) -> tuple[list, torch.Tensor]:
    """The same on the Horovod optimizer (the zero step too, so the step counters match)."""
    model = Probe()
    opt = horovod_optimizer(model, config, backward_passes_per_step=micro,
                            group_below_numel=group_below)
    rank, out = hvd.rank(), []
    for step in range(-1, steps):
        batches = [zeros() if step < 0 else targets_of(step, rank, i) for i in range(micro)]
        grads = hvd_step(model, opt, batches)
        if step >= 0:
            out.append(grads)
    return out, flat_residual(opt.quant_state, model)


def compare_with_ddp(steps: int = 4) -> dict:
    """Per case: the largest |Horovod - DDP| over every step's gradients and the final residuals.

    ``alone``: every parameter its own bucket on both (group_below_numel=1, DDP buckets of one
    parameter); ``grouped``: all parameters in one bucket on both (Horovod's per-dtype bucket in
    the reverse of the parameter order, DDP's rebuilt bucket in backward's order); ``accumulate``:
    two micro-batches per step (``backward_passes_per_step=2`` and ``no_sync()``)."""
    cases = {f"{m}/alone": (c, 1, 1, 1e-6) for m, c in DETERMINISTIC.items()}
    cases |= {f"{m}/grouped": (c, 1, 10**9, 25.0) for m, c in DETERMINISTIC.items()}
    cases["int8/accumulate"] = (DETERMINISTIC["int8"], 2, 1, 1e-6)
    out = {}
    for key, (config, micro, group_below, cap) in cases.items():
        h_grads, h_res = hvd_run(config, steps, micro, group_below)
        d_grads, d_res = ddp_run(config, steps, micro, cap)
        diff = max(float((h - d).abs().max()) for h, d in zip(h_grads, d_grads, strict=True))
        out[key] = {"max_diff": max_over_ranks(max(diff, float((h_res - d_res).abs().max()))),
                    "residual": max_over_ranks(float(h_res.abs().max())),
                    "varies": max_over_ranks(float((h_grads[-1] - h_grads[0]).abs().max()))}
    return out


def checkpoint_round_trip(config: QuantConfig, steps: int = 3) -> dict:
    """Save after ``steps`` steps, rebuild model and optimizer, load, and take the next step: the
    same gradient as the run that went straight on, bit for bit; a fresh optimizer's differs."""
    rank = hvd.rank()
    model = Probe()
    opt = horovod_optimizer(model, config)
    for step in range(steps):
        hvd_step(model, opt, [targets_of(step, rank)])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    straight = hvd_step(model, opt, [targets_of(steps, rank)])
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed_model = Probe()
    resumed_model.load_state_dict(ckpt["model"])
    resumed_opt = horovod_optimizer(resumed_model, config)
    resumed_opt.load_state_dict(ckpt["opt"])
    resumed_step = resumed_opt.quant_state.step
    resumed = hvd_step(resumed_model, resumed_opt, [targets_of(steps, rank)])
    fresh_model = Probe()
    fresh = hvd_step(fresh_model, horovod_optimizer(fresh_model, config), [targets_of(steps, rank)])
    return {"resumed_equal": all_ranks(torch.equal(straight, resumed)),
            "params_equal": all_ranks(all(torch.equal(a, b) for a, b in
                                          zip(model.parameters(), resumed_model.parameters(), strict=True))),
            "fresh_differs": all_ranks(not torch.equal(straight, fresh)),
            "saved_residuals": sorted(ckpt["opt"]["quant"]["residuals"]),
            "resumed_step": resumed_step}


def semantics(steps: int = 3) -> dict:
    """``synchronize(); step()`` sends once; ``skip_synchronize()`` warns never; ``zero_grad()``
    between backward and step is Horovod's error; a third backward with ``backward_passes_per_step=2``
    too."""
    rank = hvd.rank()
    config = DETERMINISTIC["int8"]
    model, twin = Probe(), Probe()
    opt, twin_opt = horovod_optimizer(model, config), horovod_optimizer(twin, config)
    warned, twin_warned, zero_grad_error, diffs = 0, 0, "", []
    for step in range(steps):
        opt.zero_grad()
        model(targets_of(step, rank)).backward()
        if step == 1:
            try:
                opt.zero_grad()
            except AssertionError as exc:
                zero_grad_error = str(exc)
        opt.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with opt.skip_synchronize():
                opt.step()
        warned += len(caught)
        # Not both in flight at once: the two optimizers name their collectives alike.
        twin_opt.zero_grad()
        twin(targets_of(step, rank)).backward()
        twin_opt.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            twin_opt.step()  # synchronizes again: must send nothing
        twin_warned += sum("skip_synchronize" in str(w.message) for w in caught)
        diffs.append(float((flat_grads(model) - flat_grads(twin)).abs().max()))
    steps_after = [opt.quant_state.step, twin_opt.quant_state.step]
    twin_opt.synchronize()  # after step() with no backward: a real step
    too_many = ""
    three_model = Probe()
    three = horovod_optimizer(three_model, config, backward_passes_per_step=2)
    for _ in range(3):
        try:
            three_model(targets_of(0, rank)).backward()
        except AssertionError as exc:
            too_many = str(exc)
    three.synchronize()
    return {"steps": steps_after, "step_after_extra_synchronize": twin_opt.quant_state.step,
            "max_diff": max_over_ranks(max(diffs)), "warnings": warned, "twin_warnings": twin_warned,
            "zero_grad_error": zero_grad_error, "too_many_backward_error": too_many}


def scenario_ddp() -> dict:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['DGC_TEST_PORT']}",
                            rank=hvd.rank(), world_size=hvd.size())
    try:
        compared = compare_with_ddp()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return {"ddp": compared, "checkpoint": checkpoint_round_trip(QuantConfig(method="qsgd")),
            "semantics": semantics()}


# ------------------------------------------------------------------------------------------ exchange
class ByteCounter:
    """Counts the bytes dgc.quant.horovod hands to Horovod's collectives and gets back from them
    (it calls them as ``hvd.<fn>``, so wrapping the module's functions sees every call)."""

    def __init__(self) -> None:
        self.handed = {"alltoall": 0, "allgather": 0}
        self.received = {"alltoall": 0, "allgather": 0}
        self._kind: dict[int, str] = {}
        self._saved = {}

    def start(self) -> ByteCounter:
        for fn, kind in (("alltoall_async", "alltoall"), ("allgather_async", "allgather")):
            self._saved[fn] = orig = getattr(hvd, fn)

            def launch(tensor, *args, _orig=orig, _kind=kind, **kwargs):  # noqa: ANN001, ANN202
                handle = _orig(tensor, *args, **kwargs)
                if (kwargs.get("name") or "").startswith("quant."):
                    self.handed[_kind] += tensor.numel() * tensor.element_size()
                    self._kind[handle] = _kind
                return handle

            setattr(hvd, fn, launch)
        self._saved["synchronize"] = sync = hvd.synchronize

        def wait(handle):  # noqa: ANN001, ANN202
            out = sync(handle)
            kind = self._kind.pop(handle, None)
            if kind is not None:
                t = out[0] if isinstance(out, tuple) else out
                self.received[kind] += t.numel() * t.element_size()
            return out

        hvd.synchronize = wait
        return self

    def stop(self) -> None:
        for fn, orig in self._saved.items():
            setattr(hvd, fn, orig)

    def take(self) -> dict:
        out = {"handed": dict(self.handed), "received": dict(self.received)}
        self.handed = dict.fromkeys(self.handed, 0)
        self.received = dict.fromkeys(self.received, 0)
        return out


EXCHANGE = {**DETERMINISTIC, "int8_no_feedback": QuantConfig(method="int8", error_feedback=False)}


def exchange_run(config: QuantConfig, steps: int, counter: ByteCounter) -> dict:
    rank, n = hvd.rank(), hvd.size()
    model = Probe()
    opt = horovod_optimizer(model, config)
    cum_err, local_sum, first_err, counted = torch.zeros(NUMEL), torch.zeros(NUMEL), 0.0, []
    for step in range(steps):
        targets = targets_of(step, rank)
        counter.take()
        delivered = hvd_step(model, opt, [targets])
        counted.append(counter.take())
        flat = torch.cat([t.reshape(-1) for t in targets])
        dense = sum_over_ranks(flat, "test.dense") / n
        if step == 0:
            first_err = float((delivered - dense).abs().max())
        cum_err += delivered - dense
        local_sum += flat
    state = opt.quant_state
    residual_sum = sum_over_ranks(flat_residual(state, model), "test.residual")
    total = sum_over_ranks(local_sum, "test.total")
    same = hvd.allgather(cum_err.unsqueeze(0), name="test.same")
    return {
        "first_err": max_over_ranks(first_err),
        "max_local": max_over_ranks(max(float(t.abs().max()) for t in targets_of(0, rank))),
        # N * sum of the averages + every residual - every gradient = N * cum_err + residuals
        "lost": max_over_ranks(float((n * cum_err + residual_sum).abs().max())),
        "total_max": float(total.abs().max()),
        "cum_err_max": float(cum_err.abs().max()),
        "cum_err_norm": float(cum_err.norm()),
        "residual_any": bool(residual_sum.any()),
        "same_on_every_rank": bool((same == same[0]).all()),
        "step": state.step,
        "bytes": counted,
        "stats": state.stats.to_dict(),
        "network": state.network_bytes,
        "message_bytes": qhvd_message_bytes(config, n),
    }


def qhvd_message_bytes(config: QuantConfig, n: int) -> dict[str, int]:
    """Per bucket, the message size the plan gives (the test checks the counts against it)."""
    from dgc.quant import ExchangePlan

    q = config.quantizer()
    alone = [math.prod(s) for s in SHAPES if math.prod(s) >= 1024]
    small = sum(math.prod(s) for s in SHAPES if math.prod(s) < 1024)
    return {str(k): ExchangePlan.of(k, n, q).message_bytes for k in [*alone, small]}


def scenario_exchange(steps: int = 10) -> dict:
    counter = ByteCounter().start()
    try:
        return {key: exchange_run(config, steps, counter) for key, config in EXCHANGE.items()}
    finally:
        counter.stop()


# ------------------------------------------------------------------------------------------ nonfinite
def nonfinite_run(mode: str, bad_step: int = 2, steps: int = 4) -> dict:
    """A NaN in rank 1's gradient of ``ps.2`` (exchanged alone) at ``bad_step``."""
    rank = hvd.rank()
    model = Probe()
    opt = horovod_optimizer(model, QuantConfig(method="int8", nonfinite=mode))
    state, names = opt.quant_state, [n for n, _ in model.named_parameters()]
    out = {"errors": [], "nan_grads": [], "kept": True, "dropped": []}
    for step in range(steps):
        targets = targets_of(step, rank)
        if step == bad_step and rank == 1:
            targets[2][5, 7] = float("nan")
        before = {n: state.residuals[n].clone() for n in names if n in state.residuals}
        params_before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        model(targets).backward()
        try:
            opt.synchronize()
        except FloatingPointError as exc:
            out["errors"].append([step, type(exc).__name__, str(exc)])
            out["zero_grads"] = not flat_grads(model).any()
            out["unchanged"] = all(torch.equal(a, b) for a, b in
                                   zip(params_before, model.parameters(), strict=True))
        else:
            if not torch.isfinite(flat_grads(model)).all():
                out["nan_grads"].append([step, bool(torch.isnan(flat_grads(model)).all())])
            else:
                with opt.skip_synchronize():
                    opt.step()
        if step == bad_step:
            for name, t in zip(names, targets, strict=True):
                if torch.equal(state.residuals[name], before[name]):
                    out["dropped"].append(name)
                else:  # the step's gradient is back: residual = old residual + gradient
                    out["kept"] &= torch.equal(state.residuals[name], before[name] + t.reshape(-1))
    out["step"] = state.step
    out["residual_finite"] = all(bool(torch.isfinite(r).all()) for r in state.residuals.values())
    out["params_finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return out


def scenario_nonfinite() -> dict:
    per_rank = {mode: nonfinite_run(mode) for mode in ("raise", "propagate")}
    gathered = hvd.allgather_object(per_rank, name="test.nonfinite")
    return {"ranks": gathered}


# -------------------------------------------------------------------------------------------- single
def scenario_single() -> dict:
    """One process: the gradient travels exactly and no residual is kept."""
    model = Probe()
    opt = horovod_optimizer(model, DETERMINISTIC["int8"])
    targets = targets_of(0, 0)
    grads = hvd_step(model, opt, [targets])
    return {"exact": torch.equal(grads, torch.cat([t.reshape(-1) for t in targets])),
            "residuals": len(opt.quant_state.residuals), "step": opt.quant_state.step}


SCENARIOS = {
    "ddp": scenario_ddp,
    "exchange": scenario_exchange,
    "nonfinite": scenario_nonfinite,
    "single": scenario_single,
}


def main() -> None:
    run_and_report(SCENARIOS[sys.argv[1]], sys.argv[2])


if __name__ == "__main__":
    main()
