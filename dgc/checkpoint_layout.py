"""The layout of :meth:`dgc.DGCState.state_dict`: per parameter name ``{"momentum", "residual",
"mask"}``, plus the :data:`STATE_META` keys, and the checks a loaded dict must pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .compressor import TensorMemory

__all__ = ["STATE_META", "checked_entries", "layout_of"]

STATE_META = ("step", "world_size", "rank", "config")
"""Keys of :meth:`DGCState.state_dict` that are not parameter names."""


def layout_of(memory: Mapping[str, TensorMemory]) -> dict[str, Any]:
    """Per parameter name, parameter-shaped copies of momentum, residual and mask."""
    clash = sorted(set(memory) & set(STATE_META))
    if clash:
        raise ValueError(
            f"DGC state: parameter name(s) {clash} collide with the state_dict's own keys "
            f"{sorted(STATE_META)}: rename the module attribute."
        )
    return {
        name: {
            "momentum": None if m.momentum is None else m.momentum.view(m.shape).clone(),
            "residual": m.residual.view(m.shape).clone(),
            "mask": None if m.mask is None else m.mask.view(m.shape).clone(),
        }
        for name, m in memory.items()
    }


def checked_entries(
    state: Mapping[str, Any],
    memory: Mapping[str, TensorMemory],
    world_size: int,
    rank: int,
    momentum: float,
    hierarchy: str = "flat",
) -> Mapping[str, Any]:
    """The per-parameter entries of a saved state, after checking it fits this worker (``ValueError``
    naming the mismatch: keys, world size, rank, parameter names and shapes, momentum on/off)."""
    missing_meta = sorted(k for k in ("step", "world_size", "rank") if k not in state)
    if missing_meta:
        raise ValueError(
            f"not a DGC state_dict: the keys {missing_meta} are missing (expected DGCState.state_dict())."
        )
    ws, saved_rank = int(state["world_size"]), int(state["rank"])
    if ws != world_size:
        raise ValueError(
            f"DGC state was saved with world size {ws}, this run has {world_size}: the residuals are "
            "per worker. Redistribute all ranks' states first with "
            f"dgc.reshard_state_dicts(states, world_size={world_size})."
        )
    if saved_rank != rank:
        raise ValueError(f"DGC state of rank {saved_rank} loaded on rank {rank}: load each rank's own state.")
    saved_hierarchy = (state.get("config") or {}).get("hierarchy", "flat")
    if saved_hierarchy != hierarchy:
        raise ValueError(
            f"DGC state holds the {saved_hierarchy!r} layout (DGCConfig.hierarchy) and this run uses "
            f"{hierarchy!r}: momentum and residual are kept per node share with 'node'. Resume with "
            f"DGCConfig(hierarchy={saved_hierarchy!r})."
        )
    legacy = "params" in state and "params" not in memory and isinstance(state["params"], Mapping)
    saved = state["params"] if legacy else {k: v for k, v in state.items() if k not in STATE_META}
    if set(saved) != set(memory):
        extra, missing = sorted(set(saved) - set(memory)), sorted(set(memory) - set(saved))
        raise ValueError(
            f"DGC state parameter names differ from the model's: in the checkpoint only "
            f"{extra[:5]}, in the model only {missing[:5]}."
        )
    for name, entry in saved.items():
        mem = memory[name]
        if tuple(entry["residual"].shape) != tuple(mem.shape):
            raise ValueError(
                f"DGC state for {name!r} has shape {tuple(entry['residual'].shape)}, "
                f"the model's parameter has {tuple(mem.shape)}."
            )
        if (entry["momentum"] is None) != (mem.momentum is None):
            raise ValueError(
                f"DGC state for {name!r} was saved with momentum "
                f"{'off' if entry['momentum'] is None else 'on'}, this config has momentum={momentum}."
            )
    return saved
