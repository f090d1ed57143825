"""Agreement across ranks: what every worker must share before DGC messages can be exchanged.

Fixed-size messages only line up when every rank computes the same layout: the same density schedule,
value and index formats, dense steps, tensor sizes and masks.  A rank with another ``DGCConfig`` used to
crash inside gloo ("allocated size does not match required size"), hang until the process-group timeout,
or, with another momentum, silently run a hybrid algorithm.  So at the first communication (and after
every ``load_state_dict``) the ranks exchange a small :func:`fingerprint` in one collective and every
rank raises :class:`RankMismatchError` naming the first field that differs, with both values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .state import DGCState

__all__ = ["RankMismatchError", "check_agreement", "fingerprint"]

_LOCAL_FIELDS = ("log_every", "backend", "seed")
"""Config fields a rank may set on its own: logging, kernel choice, the (rank-mixed) sampling seed."""


class RankMismatchError(ValueError):
    """Ranks disagree on something DGC needs to be identical everywhere (raised on every rank)."""


def _digest(items: Sequence[object]) -> str:
    return hashlib.sha1(repr(list(items)).encode()).hexdigest()[:12]


def fingerprint(state: DGCState, first_group: Sequence[str] = ()) -> dict[str, Any]:
    """What must match on every rank, field by field: config, world size, step, parameter names and
    shapes (in the state's order), masks (their live counts), and the first bucket's tensors."""
    out: dict[str, Any] = {
        f"DGCConfig.{k}": v for k, v in state.config.to_dict().items() if k not in _LOCAL_FIELDS
    }
    mems = list(state.memory.values())
    out["world size"] = state.world_size
    out["DGCState.step"] = state.step
    out["parameters (names, shapes)"] = _digest((m.name, tuple(m.shape)) for m in mems)
    out["pruning masks (live entries)"] = _digest(m.live for m in mems)
    out["first bucket"] = _digest(first_group)
    return out


def check_agreement(mine: dict[str, Any], gather: Callable[[Any], list[Any]]) -> None:
    """Gather every rank's fingerprint (``gather``: one all-gather of a Python object) and raise
    :class:`RankMismatchError` on every rank when any field differs."""
    everyone = gather(mine)
    for rank, theirs in enumerate(everyone):
        for key in mine:
            if theirs.get(key) != everyone[0].get(key):
                raise RankMismatchError(
                    f"DGC: ranks disagree on {key}: {everyone[0].get(key)!r} on rank 0, "
                    f"{theirs.get(key)!r} on rank {rank}. Every rank must build its DGCState from the "
                    "same DGCConfig, model and checkpoint step (and the same pruning masks); fix the "
                    "launch so that all ranks get the same settings."
                )
