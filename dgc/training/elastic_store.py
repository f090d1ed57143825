"""The key-value store a torchrun worker's process group starts from: fresh keys on every attempt.

torchrun's c10d rendezvous (``--standalone``, ``--rdzv-backend=c10d``) runs one ``TCPStore`` in the
agent and gives every attempt the same ``MASTER_ADDR:MASTER_PORT``
(``TORCHELASTIC_USE_AGENT_STORE=True``).  After ``--max-restarts`` restarts the workers, the keys the
killed attempt's process group wrote are still there, under the same names: gloo's listening
addresses, NCCL's unique id (torch 2.13: ``torch.distributed.rendezvous._create_c10d_store`` adds no
per-attempt prefix, and ``DynamicRendezvousHandler`` keeps its store server across rounds).  A
restarted rank that reads a peer's key before the peer has rewritten it connects to the dead
attempt's address: ``Gloo connectFullMesh failed ... Connection refused``, or a hang when another
socket took that port.  Whether it happens depends on which rank reaches ``init_process_group``
first, so it comes and goes with the machine's load.

``TORCHELASTIC_RESTART_COUNT`` cannot name the attempt: each agent counts its own restarts, and a
node whose workers were restarted because another node failed keeps its count
(pytorch/pytorch#135712).  So :func:`attempt_store` agrees on a name through keys that cannot be
stale:

1. rank 0 draws a new generation number (``store.add``: never handed out before);
2. every other rank asks with a token it has just drawn and waits for the answer under that token;
3. rank 0 answers every token it finds (an earlier attempt's token too, harmlessly) until every rank
   has confirmed under the new generation.

The process group then reads and writes only keys under ``dgc/pg/<generation>/``.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
import uuid

import torch.distributed as dist

__all__ = ["attempt_store", "uses_agent_store"]

log = logging.getLogger(__name__)

_ROOT = "dgc/pg"
_POLL_S = 0.05


def uses_agent_store() -> bool:
    """Whether torchrun's agent hosts the store (its keys then outlive a restarted attempt)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


def attempt_store(host: str, port: int, *, rank: int, world_size: int,
                  timeout: datetime.timedelta) -> dist.Store:
    """A store for ``init_process_group(store=...)`` whose keys no earlier attempt has written.

    Collective: every rank calls it once per attempt.  ``host``/``port``: the agent's store
    (``MASTER_ADDR``/``MASTER_PORT``); ``timeout``: how long rank 0 waits for the others.
    """
    base = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    if rank == 0:
        generation = _hand_out(base, world_size, timeout)
        restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")
        log.log(logging.INFO if restarted else logging.DEBUG,
                "torchrun attempt %s: process group keys under %s/%d/ (the agent's store still "
                "holds earlier attempts' keys)", os.environ.get("TORCHELASTIC_RESTART_COUNT"),
                _ROOT, generation)
    else:
        generation = _ask(base, rank)
    return dist.PrefixStore(f"{_ROOT}/{generation}/", base)


def _ask(store: dist.Store, rank: int) -> int:
    """Rank > 0: the generation rank 0 hands out in this attempt."""
    token = uuid.uuid4().hex
    store.set(f"{_ROOT}/ask/{rank}", token)
    generation = int(store.get(f"{_ROOT}/answer/{token}"))  # blocks until rank 0 answers
    store.set(f"{_ROOT}/{generation}/ready/{rank}", "1")
    return generation


def _hand_out(store: dist.Store, world_size: int, timeout: datetime.timedelta) -> int:
    """Rank 0: a new generation, answered to every rank's token until all have confirmed."""
    generation = store.add(f"{_ROOT}/generation", 1)
    answered: dict[int, bytes] = {}
    waiting = set(range(1, world_size))
    deadline = time.monotonic() + timeout.total_seconds()
    while waiting:
        for rank in sorted(waiting):
            if store.check([f"{_ROOT}/{generation}/ready/{rank}"]):
                waiting.discard(rank)
            elif store.check([f"{_ROOT}/ask/{rank}"]):
                token = store.get(f"{_ROOT}/ask/{rank}")
                if answered.get(rank) != token:  # a new token (or the dead attempt's: harmless)
                    store.set(f"{_ROOT}/answer/{token.decode()}", str(generation))
                    answered[rank] = token
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(
                f"ranks {sorted(waiting)} did not join the process group within dist.timeout_s = "
                f"{timeout.total_seconds():g} s; check that every worker started (their logs), or "
                f"raise dist.timeout_s.")
        if waiting:
            time.sleep(_POLL_S)
    return generation
