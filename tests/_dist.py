"""Run a function in N real ``torch.distributed`` (gloo) processes and collect what each returns."""

from __future__ import annotations

import io
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, queue) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()  # tensors by value: shared-memory handles die with the child
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException as exc:  # report every failure to the parent, which raises it
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; returns results by rank.

    ``fn`` must be importable (defined at module level).  Any rank's exception fails the call.  A gloo
    group that could not even connect (another process took a port on this busy machine) is retried
    once: that is the machine, not the code under test.
    """
    try:
        return _run_once(fn, world_size, *args, timeout=timeout)
    except RuntimeError as exc:
        if "connectFullMesh" not in str(exc) or "init_process_group" not in str(exc):
            raise
        return _run_once(fn, world_size, *args, timeout=timeout)


def _run_once(fn: Callable, world_size: int, *args: Any, timeout: float) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, init_file, fn, args, queue), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: list[str] = []
        import time

        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size and time.monotonic() < deadline:
            if not queue.empty():
                rank, status, payload = queue.get()
                if status == "ok":
                    results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                else:
                    errors.append(f"rank {rank}: {payload}")
                    break
            elif not any(p.is_alive() for p in procs) and queue.empty():
                break
            else:
                time.sleep(0.05)
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
        if errors:
            raise RuntimeError("\n".join(errors))
        if len(results) < world_size:
            raise TimeoutError(f"only ranks {sorted(results)} of {world_size} finished in {timeout}s")
        return [results[r] for r in range(world_size)]
