"""Pieces: element ranges of a parameter that go through DGC on their own (``hierarchy="node"``).

The node hierarchy cuts each bucket into contiguous element ranges, one per local rank
(:mod:`dgc.hierarchy_shards`); a cut inside a tensor splits it into pieces.  A piece is named
``"<parameter>[<start>:<stop>]"`` (elements of the flattened parameter) and has a
:class:`~dgc.compressor.TensorMemory` of its own whose momentum, residual and mask are *views* of the
parameter's: the state dict, checkpoints and statistics stay per parameter.

A name is a piece only if :meth:`Pieces.add` registered it, and a real parameter name always wins a
lookup (:meth:`dgc.DGCState.memory_of`), so a parameter whose name happens to end in ``[a:b]`` is never
taken for a piece; :meth:`Pieces.add` refuses a piece whose name is a parameter's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .compressor import TensorMemory

__all__ = ["Piece", "Pieces"]


@dataclass(frozen=True, slots=True)
class Piece:
    """Elements ``start:stop`` of the flattened parameter ``parent``."""

    parent: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.parent}[{self.start}:{self.stop}]"

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(slots=True)
class _Cached:
    sources: tuple[Tensor | None, Tensor | None, Tensor | None]
    """The parent's residual, momentum and mask the views were taken from."""
    memory: TensorMemory


class Pieces:
    """The registered pieces of one :class:`~dgc.DGCState` and their memories (views, rebuilt whenever
    the parent's residual, momentum or mask is replaced: a device move, ``set_masks``, a load)."""

    def __init__(self) -> None:
        self._pieces: dict[str, Piece] = {}
        self._cache: dict[str, _Cached] = {}

    def add(self, memory: Mapping[str, TensorMemory], parent: str, start: int, stop: int) -> str:
        """The name of elements ``start:stop`` of ``parent`` (the parameter's own name when that is
        all of it), registered."""
        mem = memory.get(parent)
        if mem is None:
            raise KeyError(f"no parameter named {parent!r} in the DGC state to cut a piece from")
        if (start, stop) == (0, mem.numel):
            return parent
        if not 0 <= start < stop <= mem.numel:
            raise ValueError(f"piece {start}:{stop} of {parent!r} lies outside its {mem.numel} elements")
        piece = Piece(parent=parent, start=start, stop=stop)
        name = piece.name
        if name in memory:
            raise ValueError(
                f"the parameter {name!r} has the name of a piece of {parent!r}: rename the module "
                "attribute, or use DGCConfig(hierarchy='flat')."
            )
        self._pieces.setdefault(name, piece)
        return name

    def get(self, name: str) -> Piece | None:
        """The piece ``name`` names, or None (a parameter, or unknown)."""
        return self._pieces.get(name)

    def memory(self, memory: Mapping[str, TensorMemory], name: str) -> TensorMemory:
        """The memory of piece ``name``: views of its parent's tensors."""
        piece = self._pieces.get(name)
        if piece is None:
            raise KeyError(f"no parameter or piece named {name!r} in the DGC state")
        parent = memory[piece.parent]
        sources = (parent.residual, parent.momentum, parent.mask)
        hit = self._cache.get(name)
        if hit is not None and all(a is b for a, b in zip(hit.sources, sources, strict=True)):
            return hit.memory
        span = slice(piece.start, piece.stop)
        mask = None if parent.mask is None else parent.mask[span]
        mem = TensorMemory(
            name=name,
            shape=torch.Size([piece.numel]),
            compressed=parent.compressed,
            residual=parent.residual[span],
            momentum=None if parent.momentum is None else parent.momentum[span],
            mask=mask,
            live=piece.numel if mask is None else int(mask.sum()),
        )
        self._cache[name] = _Cached(sources=sources, memory=mem)
        return mem

    def __getstate__(self) -> dict[str, object]:
        # the views would pickle as copies, detached from their parents: rebuild them on first use
        return {"_pieces": dict(self._pieces), "_cache": {}}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
