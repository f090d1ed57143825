"""Elastic resize: turn the per-rank DGC states of N workers into the states of M workers.

What DGC still owes the model is the *mean over workers* of the residuals (and, through the
momentum correction, of the momenta): every step the hook averages what the workers send, so a
worker's residual ``v_i`` reaches the model as ``v_i / N``.  :func:`reshard_state_dicts` keeps that
mean exactly: every new rank gets the mean residual and the mean momentum of the old ranks, so

    (1/M) * sum_j v'_j = (1/M) * M * mean_i(v_i) = (1/N) * sum_i v_i

and likewise for the momenta (computed in float64, stored in the saved dtype, float32).  The
alternative that also keeps the mean, rank 0 holding ``M * mean`` and the others zero, was not
chosen: it puts an M-times larger residual on one worker, whose top-k would then be dominated by
old debt, and leaves the other workers' momenta empty, so the momentum correction of the next
steps would differ between ranks by a factor M.  With the mean everywhere every new rank starts
from the same state, as the ranks of a fresh run do.

Step and config are kept (they must agree across the old ranks), pruning masks too (they must be
identical on every rank, since message sizes depend on them); ``world_size`` and ``rank`` are set
for the new run, so :meth:`dgc.DGCState.load_state_dict` accepts the result on each new rank.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["reshard_state_dicts"]

log = logging.getLogger(__name__)

_TOPOLOGY = ("world_size", "rank")
_TENSORS = ("momentum", "residual")


def reshard_state_dicts(state_dicts: Sequence[Mapping[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """The ``world_size`` per-rank states (index = new rank) that continue the N given ones.

    ``state_dicts``: every old rank's :meth:`dgc.DGCState.state_dict` (any order, each rank exactly
    once).  Every new rank gets the old ranks' mean residual and mean momentum (see the module
    docstring for why), the common step, config and masks, and its own ``world_size``/``rank``.
    Raises ``ValueError`` naming the problem when ranks are missing or repeated, when the old ranks
    disagree (step, config, parameter names or shapes, masks, momentum on/off) or when
    ``world_size`` < 1.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"reshard_state_dicts: world_size = {world_size!r} is invalid: it must be an "
                         "integer >= 1 (the number of workers of the resumed run).")
    old = _by_rank(state_dicts)
    meta, params = _split(old[0], rank=0)
    for rank, sd in enumerate(old[1:], start=1):
        _check_same(meta, params, sd, rank)
    merged: dict[str, Any] = {}
    for name, entry in params.items():
        entries = [_split(sd, rank)[1][name] for rank, sd in enumerate(old)]
        merged[name] = {
            **{k: v for k, v in entry.items() if k not in _TENSORS},
            **{k: _mean([e[k] for e in entries]) for k in _TENSORS},
        }
    out = []
    for rank in range(world_size):
        sd: dict[str, Any] = {name: {k: _copy(v) for k, v in e.items()} for name, e in merged.items()}
        sd.update({k: v for k, v in meta.items() if k not in _TOPOLOGY})
        sd.update(world_size=world_size, rank=rank)
        out.append(sd)
    log.debug("DGC state resharded from %d to %d workers at step %s: every new rank holds the mean "
             "residual and momentum of the old ranks (%d tensors)", len(old), world_size,
             meta.get("step"), len(merged))
    return out


def _by_rank(state_dicts: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The old states ordered by rank, checked to be ranks 0..N-1 of one N-worker run."""
    if isinstance(state_dicts, Mapping) or not isinstance(state_dicts, Sequence) or not state_dicts:
        raise ValueError("reshard_state_dicts: state_dicts must be a non-empty list of per-rank "
                         "DGCState.state_dict() dicts (one per old rank).")
    n = len(state_dicts)
    seen: dict[int, Mapping[str, Any]] = {}
    for i, sd in enumerate(state_dicts):
        if not isinstance(sd, Mapping) or any(k not in sd for k in ("step", *_TOPOLOGY)):
            raise ValueError(f"reshard_state_dicts: state_dicts[{i}] is not a DGCState.state_dict() "
                             "(needs the keys step, world_size and rank).")
        saved_ws, rank = int(sd["world_size"]), int(sd["rank"])
        if saved_ws != n:
            raise ValueError(f"reshard_state_dicts: state_dicts[{i}] (rank {rank}) was saved by a run of "
                             f"{saved_ws} workers but {n} states were given: pass every old rank's "
                             "state, each exactly once.")
        if rank in seen:
            raise ValueError(f"reshard_state_dicts: rank {rank} appears twice: pass each old rank's "
                             "state exactly once.")
        seen[rank] = sd
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise ValueError(f"reshard_state_dicts: ranks {missing} of the {n}-worker run are missing "
                         f"(got ranks {sorted(seen)}): pass every old rank's state.")
    return [seen[r] for r in range(n)]


def _split(sd: Mapping[str, Any], rank: int) -> tuple[dict[str, Any], dict[str, Mapping[str, Any]]]:
    """(meta keys, per-parameter entries); also reads the nested ``params`` layout of dgc <= 0.1."""
    nested = sd.get("params")
    if isinstance(nested, Mapping) and all(isinstance(e, Mapping) and "residual" in e
                                           for e in nested.values()):
        meta = {k: v for k, v in sd.items() if k != "params"}
        return meta, dict(nested)
    params = {k: v for k, v in sd.items() if isinstance(v, Mapping) and "residual" in v}
    meta = {k: v for k, v in sd.items() if k not in params}
    if not params:
        raise ValueError(f"reshard_state_dicts: the state of rank {rank} holds no parameters "
                         "(expected DGCState.state_dict()).")
    return meta, params


def _check_same(meta: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]],
                sd: Mapping[str, Any], rank: int) -> None:
    """Raise ``ValueError`` where rank ``rank``'s state disagrees with rank 0's."""
    other_meta, other_params = _split(sd, rank)
    for key in sorted((meta.keys() | other_meta.keys()) - set(_TOPOLOGY)):
        diff = _difference(meta.get(key), other_meta.get(key), key)
        if diff is not None:
            where, a, b = diff
            raise ValueError(f"reshard_state_dicts: the old ranks disagree on {where}: rank 0 has "
                             f"{a!r}, rank {rank} has {b!r}. Pass the states of one checkpoint "
                             "(one run, all ranks saved at the same step).")
    if set(params) != set(other_params):
        diff = sorted(set(params) ^ set(other_params))
        raise ValueError(f"reshard_state_dicts: ranks 0 and {rank} track different parameters "
                         f"({diff[:5]}): the states belong to different models.")
    for name, entry in params.items():
        other = other_params[name]
        for key in _TENSORS:
            a, b = entry.get(key), other.get(key)
            if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
                raise ValueError(f"reshard_state_dicts: {name}.{key} differs in shape or presence "
                                 f"between ranks 0 and {rank}: the states belong to different runs.")
        if not _equal(entry.get("mask"), other.get("mask")):
            raise ValueError(f"reshard_state_dicts: the pruning mask of {name!r} differs between ranks "
                             f"0 and {rank}; masks must be identical on every rank.")


def _mean(tensors: list[Tensor | None]) -> Tensor | None:
    if tensors[0] is None:
        return None
    total = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for t in tensors:
        total += t.to(torch.float64)
    return (total / len(tensors)).to(tensors[0].dtype)


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _difference(a: Any, b: Any, where: str) -> tuple[str, Any, Any] | None:
    """The first differing field of two meta values (``config.density``, ...), or None."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(a.keys() | b.keys(), key=str):
            diff = _difference(a.get(key), b.get(key), f"{where}.{key}")
            if diff is not None:
                return diff
        return None
    return None if _equal(a, b) else (where, a, b)
