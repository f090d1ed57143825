"""Resume on another world size: the per-rank part of a checkpoint of N ranks, redistributed to M.

A checkpoint's ``rank-*.pt`` files hold what differs per worker; each key has its own rule:

* ``comm``: the DGC state (``comm["dgc"]``) through :func:`dgc.reshard_state_dicts`: every new rank
  gets the mean residual and momentum of the old ranks, so what DGC still owes the model is
  unchanged.  A compression state that is identical on every old rank (``none``, ``fp16``) is
  copied; per-rank state that has no resize rule (PowerSGD's error feedback) is refused.
* ``rng``: new rank r < N continues old rank r's random streams; a new rank r >= N starts the
  stream a fresh run gives rank r (``seed + 1 + r``), so no two ranks draw the same dropout.
* ``meter`` (this epoch's loss/accuracy sums): the old ranks' totals split evenly over the new
  ranks, so the epoch's totals (summed over ranks at its end) are exact.
* ``epoch_traffic``, ``run_traffic``, ``epoch_seconds``, ``run_seconds`` (one worker's view):
  new rank r takes old rank r's (rank 0's when r >= N).
* Any other key must be equal on every old rank (it is copied); otherwise the resume is refused.

The position in the epoch moves with the samples: after ``b`` batches of ``B`` samples on N ranks
the first ``b * B * N`` samples of the epoch's order are done (``DistributedSampler`` deals them
round robin), so the M-rank run continues at batch ``floor(b * N / M)``; up to ``B * M - 1``
samples of this epoch are seen a second time (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf

from dgc.reshard import reshard_state_dicts
from dgc.training.rng import get_rng_state, seed_everything, set_rng_state

__all__ = ["resize_rank_state"]

log = logging.getLogger(__name__)

_PER_WORKER = ("epoch_traffic", "run_traffic", "epoch_seconds", "run_seconds")


def resize_rank_state(common: dict[str, Any], old: Sequence[dict[str, Any]], *, world_size: int,
                      rank: int, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(common, per_rank)`` for rank ``rank`` of a ``world_size``-rank run, from the per-rank
    states ``old`` (index = old rank) of the checkpoint ``source``; ``common`` gets the new batch
    position and world size.  Raises ``ValueError`` where a key cannot be redistributed."""
    n = len(old)
    keys = set().union(*(o.keys() for o in old))
    mine: dict[str, Any] = {}
    for key in sorted(keys):
        values = [o.get(key) for o in old]
        if key == "comm":
            mine[key] = _resize_comm(values, world_size, rank, n, source)
        elif key == "rng":
            mine[key] = values[rank] if rank < n else _fresh_rng(common, rank)
        elif key == "meter":
            mine[key] = _split_meter(values, world_size, rank)
        elif key in _PER_WORKER:
            mine[key] = values[rank if rank < n else 0]
        elif all(v == values[0] for v in values[1:]):
            mine[key] = values[0]
        else:
            raise ValueError(
                f"checkpoint {source} was written by {n} ranks and this run has {world_size}: its "
                f"per-rank entry {key!r} differs between the old ranks and has no resize rule. Resume "
                f"with {n} processes (e.g. torchrun --nproc_per_node={n})."
            )
    batch = int(common.get("batch", 0))
    new_batch = batch * n // world_size
    common = {**common, "batch": new_batch, "world_size": world_size}
    if rank == 0:
        repeated = (batch * n - new_batch * world_size) * int(_config(common, "train.batch_size", 0))
        log.info(
            "resuming %s, written by %d ranks, on %d ranks: DGC residuals and momenta averaged over "
            "the old ranks and given to every new rank (what is owed to the model is unchanged); "
            "epoch %d continues at batch %d of the %d-rank order (was batch %d of the %d-rank order; "
            "%d samples of this epoch are seen a second time); random streams of ranks >= %d start "
            "fresh", source, n, world_size, int(common.get("epoch", 0)) + 1, new_batch, world_size,
            batch, n, repeated, n,
        )
    return common, mine


def _resize_comm(values: list[Any], world_size: int, rank: int, n: int, source: str) -> Any:
    if all(isinstance(v, dict) and "dgc" in v for v in values):
        mean = reshard_state_dicts([v["dgc"] for v in values], 1)[0]  # every new rank: the mean
        mean.update(world_size=world_size, rank=rank)
        return {**{k: v for k, v in values[0].items() if k != "dgc"}, "dgc": mean}
    if all(_same(v, values[0]) for v in values[1:]):
        return values[0]
    name = values[0].get("name") if isinstance(values[0], dict) else None
    raise ValueError(
        f"checkpoint {source} was written by {n} ranks and this run has {world_size}, but "
        f"compress={name} keeps per-rank state (error feedback) that cannot be redistributed. Resume "
        f"with {n} processes (e.g. torchrun --nproc_per_node={n}), or start a new run from the weights."
    )


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError):  # tensors inside: not comparable as a whole
        return False


def _split_meter(values: list[dict[str, Any]], world_size: int, rank: int) -> dict[str, Any]:
    """This rank's share of the old ranks' summed meter (integers split exactly)."""
    loss = sum(float(v["loss_sum"]) for v in values)
    out: dict[str, Any] = {"loss_sum": loss / world_size}
    for key in ("correct", "count"):
        total = sum(int(v[key]) for v in values)
        out[key] = total // world_size + (1 if rank < total % world_size else 0)
    return out


def _fresh_rng(common: dict[str, Any], rank: int) -> dict[str, Any]:
    """The generator states a fresh run gives ``rank`` (seeded ``seed + 1 + rank``, as the loop does)."""
    seed = int(_config(common, "seed", 0))
    before = get_rng_state()
    try:
        seed_everything(seed + 1 + rank)
        return get_rng_state()
    finally:
        set_rng_state(before)


def _config(common: dict[str, Any], key: str, default: Any) -> Any:
    """A value of the run's config saved in ``common["config"]`` (YAML), or ``default``."""
    if not common.get("config"):
        return default
    value = OmegaConf.select(OmegaConf.create(common["config"]), key, default=default)
    return default if value is None else value
