"""The Hugging Face Accelerate recipe of docs/integrations.md on 2 real CPU (gloo) processes:
``accelerator.prepare(...)`` then ``dgc.register(model, optimizer, config)``; with
``accelerator.accumulate`` DGC communicates once per optimizer step and gives exactly what a hand-written
DDP loop with ``no_sync()`` gives."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate")

from _dist import run_distributed  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import dgc  # noqa: E402

BATCHES = 8
ACCUMULATE = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    return [(torch.randn(8, 32, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(BATCHES)]


def _config() -> dgc.DGCConfig:
    return dgc.DGCConfig(density=0.05, momentum=0.9, dense_steps=1, min_compress_numel=1024)


def _accelerate_run(rank: int) -> dict[str, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # momentum lives in DGC
    model, optimizer = accelerator.prepare(model, optimizer)
    state = dgc.register(model, optimizer, _config())  # the one added line
    steps_at_sync, optimizer_steps = [], 0
    for x, y in _batches(rank):
        with accelerator.accumulate(model):
            loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            steps_at_sync.append(state.step)  # communication steps so far
            if accelerator.sync_gradients:
                optimizer_steps += 1
            optimizer.step()
            optimizer.zero_grad()
    return {
        "distributed": str(accelerator.distributed_type),
        "is_ddp": isinstance(model, DDP),
        "steps_at_sync": steps_at_sync,
        "optimizer_steps": optimizer_steps,
        "dgc_step": state.step,
        "stats": state.stats.to_dict(),
        "params": {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).named_parameters()},
    }


def _manual_run(rank: int) -> dict[str, torch.Tensor]:
    """The same training as a plain DDP loop: no_sync() on the accumulating micro-batches."""
    model = DDP(_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dgc.register(model, optimizer, _config())
    for i, (x, y) in enumerate(_batches(rank)):
        sync = (i + 1) % ACCUMULATE == 0
        ctx = model.no_sync() if not sync else torch.enable_grad()
        with ctx:
            (nn.functional.cross_entropy(model(x), y) / ACCUMULATE).backward()
        if sync:
            optimizer.step()
            optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.module.named_parameters()}


def _worker(rank: int, world: int, port: int) -> dict[str, Any]:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = _accelerate_run(rank)
    out["manual"] = _manual_run(rank)
    return out


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    import socket

    with socket.socket() as s:  # the group itself is set up by file; Accelerate wants an address
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return run_distributed(_worker, 2, port, timeout=200)


def test_recipe_runs_dgc_under_accelerate(runs: list[dict[str, Any]]) -> None:
    for r in runs:
        assert r["distributed"].endswith("MULTI_CPU") and r["is_ddp"]
        stats = r["stats"]
        assert stats["sparse_buckets"] >= 1
        assert 0 < stats["bytes_sent"] < stats["dense_bytes"] / 2
    for name, p in runs[0]["params"].items():
        assert torch.equal(p, runs[1]["params"][name]), name


def test_accumulate_communicates_once_per_optimizer_step(runs: list[dict[str, Any]]) -> None:
    for r in runs:
        assert r["optimizer_steps"] == BATCHES // ACCUMULATE
        assert r["dgc_step"] == r["optimizer_steps"]
        # The hook runs on the last micro-batch of each accumulation window only.
        assert r["steps_at_sync"] == [(i + 1) // ACCUMULATE for i in range(BATCHES)]


def test_accelerate_equals_hand_written_no_sync_loop(runs: list[dict[str, Any]]) -> None:
    for r in runs:
        for name, p in r["manual"].items():
            torch.testing.assert_close(r["params"][name], p, rtol=0, atol=0, msg=name)
