"""A restarted torchrun attempt's process group never reads the killed attempt's keys
(dgc.training.elastic_store): torchrun's agent keeps one store across attempts, and a rank that
read a peer's stale gloo address failed with "Gloo connectFullMesh failed ... Connection refused"
(or hung) when that peer reached ``init_process_group`` later than it."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch.distributed as dist

from dgc.training.elastic_store import attempt_store
from dgc.training.faults import EXIT_CODE

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = datetime.timedelta(seconds=30)


def agent_store() -> dist.TCPStore:
    """What torchrun's agent runs: one store server for every attempt."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)


def join(port: int, rank: int, world_size: int, wait: threading.Event | None = None) -> dist.Store:
    if wait is not None:
        assert wait.wait(30)
    return attempt_store("127.0.0.1", port, rank=rank, world_size=world_size, timeout=TIMEOUT)


@pytest.mark.timeout(120)
def test_the_second_attempt_sees_none_of_the_first_attempts_keys():
    """Attempt 1 writes an address per rank (as gloo does).  In attempt 2, rank 2 joins late:
    ranks 0 and 1 must not see attempt 1's address of rank 2 meanwhile (the stale token rank 2
    left in attempt 1 is answered, harmlessly), and all three agree on the new keys."""
    server = agent_store()
    with ThreadPoolExecutor(3) as pool:
        first = list(pool.map(lambda r: join(server.port, r, 3), range(3)))
        for rank, store in enumerate(first):
            store.set(f"rank_{rank}", "attempt-1")
        late = threading.Event()
        joined = [pool.submit(join, server.port, 0, 3), pool.submit(join, server.port, 1, 3),
                  pool.submit(join, server.port, 2, 3, late)]
        server.wait(["dgc/pg/2/ready/1"])  # rank 1 has joined attempt 2 (generation 2) ...
        assert not joined[0].done()  # ... and rank 0 still waits for rank 2
        late.set()
        second = [f.result(timeout=60) for f in joined]
    for rank, store in enumerate(second[:2]):
        assert not store.check(["rank_2"])  # attempt 1's key of rank 2 is not visible
        store.set(f"rank_{rank}", "attempt-2")
    second[2].set("rank_2", "attempt-2")
    for store in second:
        assert [store.get(f"rank_{r}") for r in range(3)] == [b"attempt-2"] * 3
    assert [first[0].get(f"rank_{r}") for r in range(3)] == [b"attempt-1"] * 3  # untouched


@pytest.mark.timeout(60)
def test_rank_0_names_the_ranks_that_never_joined():
    server = agent_store()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] .*dist.timeout_s"):
        attempt_store("127.0.0.1", server.port, rank=0, world_size=2,
                      timeout=datetime.timedelta(seconds=0.5))


SCRIPT = """
import os, time
import torch
from dgc.training.faults import maybe_fail
from dgc.training.runtime import DDPRuntime

rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if attempt == 1 and rank == 1:
    time.sleep(5)  # rank 0 reaches init_process_group first and looks up rank 1's address
runtime = DDPRuntime(backend="gloo", timeout_s=120)
runtime.init()
t = torch.ones(1)
runtime.all_reduce_sum(t)
maybe_fail(1, rank)  # DGC_FAIL_AT_STEP=1:1: rank 1 exits hard on the first attempt
runtime.all_reduce_sum(t)
runtime.barrier()
runtime.shutdown()
print(f"attempt {attempt} rank {rank} sum {t.item():g}", flush=True)
"""


@pytest.mark.timeout(300)
def test_torchrun_restart_with_a_late_rank(tmp_path):
    """Under torchrun --max-restarts=1, rank 1 dies on the first attempt and starts 5 s late on
    the second: the second attempt's process group still forms (was: connectFullMesh refused)."""
    script = tmp_path / "restart.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DGC_FAIL_AT_STEP": "1:1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-5000:]
    assert f"exitcode: {EXIT_CODE}" in text  # the first attempt did fail
    assert "attempt 1 rank 0 sum 4" in proc.stdout and "attempt 1 rank 1 sum 4" in proc.stdout
