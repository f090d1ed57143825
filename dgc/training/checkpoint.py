"""Checkpoints: one folder per save, complete or absent (a crash mid-write keeps the previous one).

Layout under ``train.checkpoint.dir``::

    step-00000120/common.pt       rank 0: model, optimizer, LR schedule, position, config
    step-00000120/rank-00000.pt   every rank: its compression state (DGC residuals and momenta
    step-00000120/rank-00001.pt   differ per worker), its random generators, its running sums
    latest                        the name of the newest complete folder

Every file is written to a temporary name and moved into place with ``os.replace`` (atomic on
POSIX); the folder is assembled under a hidden ``.step-N.partial`` name and renamed once every
rank has written, then ``latest`` is replaced.  Files load with ``torch.load(weights_only=True)``.
On several machines the folder must be on storage every node sees (each rank reads
``common.pt`` and writes its own file).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "atomic_save", "load_checkpoint", "resolve_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)

FORMAT = 1
"""Version of the checkpoint layout, stored in ``common.pt``."""


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, flush it to disk, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.pt"


def save_checkpoint(root: str | os.PathLike[str], step: int, *, rank: int, common: dict[str, Any],
                    per_rank: dict[str, Any], barrier: Any, keep: int | None = None) -> Path:
    """Collective: every rank calls it with its ``per_rank`` state (``common`` is used on rank 0).

    ``barrier`` is the runtime's barrier.  ``keep`` = how many folders to keep (None = all).
    """
    root = Path(root)
    final = root / f"step-{step:08d}"
    partial = root / f".step-{step:08d}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash
        partial.mkdir()
    barrier()
    atomic_save(per_rank, _rank_file(partial, rank))
    if rank == 0:
        atomic_save({**common, "format": FORMAT, "step": step}, partial / "common.pt")
    barrier()  # every file of this checkpoint is on disk
    if rank == 0:
        if final.exists():  # the same step saved by an earlier run into this folder
            shutil.rmtree(final)
        os.replace(partial, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / "latest")
        if keep is not None:
            for old in sorted(root.glob("step-*"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    barrier()
    return final


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder from ``path``: the folder itself, or a root whose ``latest`` names one."""
    p = Path(path)
    if (p / "common.pt").is_file():
        return p
    if (p / "latest").is_file():
        folder = p / (p / "latest").read_text().strip()
        if (folder / "common.pt").is_file():
            return folder
    raise FileNotFoundError(
        f"train.resume = {str(path)!r} is not a checkpoint: expected a folder with common.pt "
        "(e.g. .../checkpoints/step-00000120) or a checkpoint root with a 'latest' file."
    )


def load_checkpoint(path: str | os.PathLike[str], *, rank: int,
                    world_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(common, per_rank)`` of this rank, checked against this run's world size."""
    folder = resolve_checkpoint(path)
    common = torch.load(folder / "common.pt", map_location="cpu", weights_only=True)
    if common.get("format") != FORMAT:
        raise ValueError(f"{folder} has checkpoint format {common.get('format')!r}; this version "
                         f"reads format {FORMAT}.")
    saved = int(common["world_size"])
    if saved != world_size:
        raise ValueError(
            f"checkpoint {folder} was written by {saved} ranks and this run has {world_size}: "
            "compression residuals, random generators and data shards are per rank. Resume with "
            f"the same number of processes (e.g. torchrun --nproc_per_node={saved})."
        )
    rank_file = _rank_file(folder, rank)
    if not rank_file.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {rank_file.name}: on several machines "
                                "put train.checkpoint.dir on storage every node sees.")
    per_rank = torch.load(rank_file, map_location="cpu", weights_only=True)
    return common, per_rank
