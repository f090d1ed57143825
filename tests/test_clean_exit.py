"""Clean exit (issue 12): the README's toy script, DGC hook and no barrier, never aborts at exit.

The abort ("terminate called without an active exception") is a gloo worker thread taking the GIL while
the interpreter finalizes.  Two ways our hook handed such a thread Python work (docs/reliability.md):
the ``Future.then`` callback, which the thread drops (under the GIL) after the future completed, and the
Python object ``backward()`` stashes in torch's thread-local state, which every ``Work`` captures and
the thread releases when it destroys the work.  The in-process test checks both deterministically; the
torchrun test runs the script itself (6 runs here; ``launch/check_clean_exit.py`` runs 20).
"""

from __future__ import annotations

import importlib.util
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from _dist import run_distributed
from ddp_workers import ToyModel
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc

ROOT = Path(__file__).resolve().parent.parent
RUNS = 6
RUN_TIMEOUT_S = 120.0
_COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather_object",
                "broadcast")


def _checker():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("check_clean_exit", ROOT / "launch/check_clean_exit.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _python_tls() -> bool:
    return bool(torch._C._is_key_in_tls("context"))


def what_gloo_threads_get(rank: int, world: int, steps: int = 4) -> dict:
    """Train the toy with the DGC hook; record whether each collective and each ``Future.then`` of the
    hook was issued with a Python object in torch's thread-local state, and which ``then`` callbacks
    were still alive when the hook's last bucket call returned."""
    seen: dict[str, list[bool]] = {"collectives": [], "then": []}
    callbacks: list[weakref.ref] = []
    alive_after_step: list[int] = []
    for name in _COLLECTIVES:
        orig = getattr(dist, name, None)
        if orig is None:
            continue

        def spy(*args, _orig=orig, **kwargs):  # noqa: ANN002, ANN003, ANN202
            seen["collectives"].append(_python_tls())
            return _orig(*args, **kwargs)

        setattr(dist, name, spy)
    then = torch._C.Future.then  # Work.get_future() returns the C++ class

    def then_spy(self, callback):  # noqa: ANN001, ANN202
        seen["then"].append(_python_tls())
        callbacks.append(weakref.ref(callback))
        return then(self, callback)

    torch._C.Future.then = then_spy

    def hook(state, bucket):  # noqa: ANN001, ANN202 (DDP checks annotations: none here, strings are refused)
        fut = dgc.ddp_comm_hook(state, bucket)
        if bucket.is_last():
            alive_after_step.append(sum(ref() is not None for ref in callbacks))
            callbacks.clear()
        return fut

    torch.manual_seed(0)
    model = DDP(ToyModel())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    state = dgc.DGCState(dgc.DGCConfig(density=0.01, min_compress_numel=16),
                         model.module.named_parameters())
    model.register_comm_hook(state, hook)
    gen = torch.Generator().manual_seed(rank)
    in_backward = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(torch.randn(20, 10, generator=gen)),
                                      torch.randn(20, 5, generator=gen))
        loss.register_hook(lambda g: in_backward.append(_python_tls()) or g)
        loss.backward()
        opt.step()
    return dict(seen, alive_after_step=alive_after_step, in_backward=in_backward,
                after=_python_tls(), bytes_sent=state.stats.bytes_sent)


def test_nothing_of_the_hook_needs_the_gil_in_a_gloo_thread_after_the_step() -> None:
    for r in run_distributed(what_gloo_threads_get, 2, timeout=120):
        assert r["in_backward"] and all(r["in_backward"]), "backward() stashes its context: premise"
        assert r["collectives"] and not any(r["collectives"]), (
            "a collective of the hook captured backward()'s Python context: its Work's destructor "
            "takes the GIL in a gloo thread"
        )
        assert r["then"] and not any(r["then"]), "a then-callback captured backward()'s context"
        assert r["alive_after_step"] == [0, 0, 0, 0], (
            f"callbacks still held by gloo threads when the step's last hook call returned: "
            f"{r['alive_after_step']} (their disposal takes the GIL)"
        )
        assert r["after"] is False and r["bytes_sent"] > 0


def test_toy_script_extraction_has_the_hook_and_no_barrier() -> None:
    mod = _checker()
    script = mod.toy_script()
    assert mod.HOOK_LINE in script and "dist.barrier(" not in script
    assert "destroy_process_group" in script
    plain = mod.toy_script(without_dgc=True)
    assert "dgc.ddp_comm_hook" not in plain and "dgc.DGCState(" not in plain
    compile(plain, "toy.py", "exec")
    compile(mod.toy_script(stress=True), "toy.py", "exec")


@pytest.mark.slow
@pytest.mark.timeout(int(RUNS * RUN_TIMEOUT_S) + 60)
def test_readme_toy_script_exits_cleanly_under_torchrun() -> None:
    results = _checker().run_many(RUNS, timeout=RUN_TIMEOUT_S)
    bad = [f"run {i + 1}: {r.why()}" for i, r in enumerate(results) if not r.clean]
    assert not bad, f"{RUNS - len(bad)} of {RUNS} clean:\n" + "\n".join(bad)
