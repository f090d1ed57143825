"""Checkpoints: one folder per save, complete or absent (a crash mid-write keeps the previous one).

Layout under ``train.checkpoint.dir``::

    step-00000120/common.pt              rank 0: model, optimizer, LR schedule, position, config
    step-00000120/common.pt.sha256       its checksum (``sha256sum`` format)
    step-00000120/rank-00000.pt          every rank: its compression state (DGC residuals and
    step-00000120/rank-00000.pt.sha256   momenta differ per worker), its random generators, its
    step-00000120/rank-00001.pt ...      running sums; each with its checksum
    latest                               the name of the newest complete folder

Every file is written to a temporary name and moved into place with ``os.replace`` (atomic on
POSIX), then its SHA-256 is written next to it (``cd step-00000120 && sha256sum -c *.sha256``
checks a folder by hand); the folder is assembled under a hidden ``.step-N.partial`` name and
renamed once every rank has written, then ``latest`` is replaced.  Files load with
``torch.load(weights_only=True)``.  On several machines the folder must be on storage every node
sees (each rank reads ``common.pt`` and writes its own file).

Loading (:func:`load_checkpoint`) checks every file of a folder against its checksum before
reading it; a corrupt, partial or missing file raises :class:`CheckpointError` naming it, and the
loader falls back to the newest older intact folder under the same root (logged).  Every rank runs
the same checks on the same files, so every rank picks the same folder.  A checkpoint written by
another number of ranks is redistributed to this run's ranks (:mod:`dgc.training.resize`, logged).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dgc.training.resize import resize_rank_state

__all__ = ["AUTO", "FORMAT", "CheckpointError", "atomic_save", "checkpoint_folders", "load_checkpoint",
           "resolve_checkpoint", "resume_source", "save_checkpoint", "verify_file"]

log = logging.getLogger(__name__)

FORMAT = 2
"""Version of the checkpoint layout, stored in ``common.pt`` (2: every file has a ``.sha256``
checksum; 1, still read: no checksums)."""

_READS = (1, 2)


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, partial or missing (the message names it)."""


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, flush it to disk, rename it over ``path``; then the same
    for its checksum, ``path`` + ``.sha256``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    _atomic_write(path, data)
    _atomic_write(_checksum_file(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify_file(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` exists and matches its ``.sha256`` file."""
    side = _checksum_file(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing: the checkpoint is incomplete.")
    if not side.is_file():
        raise CheckpointError(f"checkpoint file {path} has no checksum file {side.name}: the save "
                              "did not finish, or the file was copied without it.")
    expected = (side.read_text().split() or [""])[0]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise CheckpointError(f"checkpoint file {path} is corrupt or partial: its SHA-256 is "
                              f"{digest.hexdigest()[:16]}..., {side.name} says {expected[:16]}... "
                              f"({path.stat().st_size} bytes on disk).")


def _load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, any failure a :class:`CheckpointError` naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(e).__name__}: "
                              f"{first[:200]}): it is corrupt or partial.") from e


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


AUTO = "auto"
"""``train.resume = auto``: the newest intact checkpoint under ``train.checkpoint.dir`` if there is
one, else a fresh start; what a job restarted by ``torchrun --max-restarts`` needs, since every
attempt runs the same command line."""


def resume_source(resume: str | os.PathLike[str] | None,
                  checkpoint_dir: str | os.PathLike[str] | None) -> str | None:
    """What ``train.resume`` asks to load: None (fresh start) or a path for :func:`load_checkpoint`.

    ``auto`` resolves to ``checkpoint_dir`` when it holds a checkpoint folder, else None (logged).
    """
    if resume is None or str(resume) != AUTO:
        return None if resume is None else str(resume)
    if checkpoint_dir is None:
        raise ValueError("train.resume = auto needs train.checkpoint.dir (where to look for the "
                         "newest checkpoint); it is null.")
    root = Path(checkpoint_dir)
    if root.is_dir() and ((root / "latest").is_file() or any(root.glob("step-*"))):
        return str(root)
    log.info("train.resume = auto: no checkpoint under %s yet, starting fresh", root)
    return None


def checkpoint_folders(path: str | os.PathLike[str]) -> list[Path]:
    """The folders a resume from ``path`` tries, in order: the folder named (or the newest one of a
    checkpoint root: its ``latest``), then the older ``step-*`` folders next to it, newest first."""
    p = Path(path)
    named = p.name.startswith("step-") or (p / "common.pt").is_file()
    if named and not p.is_dir():
        raise FileNotFoundError(f"train.resume = {str(path)!r}: no such checkpoint folder.")
    root = p.parent if named else p
    first: Path | None = p if named else None
    if not named and (p / "latest").is_file():
        first = p / (p / "latest").read_text().strip()
    older = sorted((f for f in root.glob("step-*") if f.is_dir()), reverse=True) if root.is_dir() else []
    if first is not None:
        older = [f for f in older if f.name < first.name]
    folders = ([first] if first is not None else []) + older
    if not folders:
        raise FileNotFoundError(
            f"train.resume = {str(path)!r} is not a checkpoint: expected a folder with common.pt "
            "(e.g. .../checkpoints/step-00000120) or a checkpoint root with a 'latest' file."
        )
    return folders


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The first folder a resume from ``path`` tries (see :func:`checkpoint_folders`)."""
    return checkpoint_folders(path)[0]


def load_checkpoint(path: str | os.PathLike[str], *, rank: int,
                    world_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(common, per_rank)`` of this rank from the newest intact checkpoint of ``path``.

    Each folder of :func:`checkpoint_folders` is checked file by file (checksums); a bad file is
    logged, naming it, and the next older folder is tried; :class:`CheckpointError` when none is
    intact.  A checkpoint of another world size is redistributed to this run's ranks
    (:func:`dgc.training.resize.resize_rank_state`: DGC states through
    :func:`dgc.reshard_state_dicts`), logged on rank 0.
    """
    problems: list[str] = []
    for folder in checkpoint_folders(path):
        try:
            common = _check_folder(folder)
            loaded = _restore(folder, common, rank=rank, world_size=world_size)
        except CheckpointError as e:
            problems.append(str(e))
            if rank == 0:
                log.warning("%s Trying the previous checkpoint.", e)
            continue
        if problems and rank == 0:
            log.warning("resuming from %s, the newest intact checkpoint (%d newer skipped)", folder,
                        len(problems))
        return loaded
    raise CheckpointError(f"train.resume = {str(path)!r}: no intact checkpoint:\n  "
                          + "\n  ".join(problems))


def _check_folder(folder: Path) -> dict[str, Any]:
    """``common.pt`` of ``folder`` once every file of the folder passed its checksum."""
    common_file = folder / "common.pt"
    checked = _checksum_file(common_file).is_file()
    if checked:
        verify_file(common_file)
    elif not common_file.is_file():
        raise CheckpointError(f"checkpoint file {common_file} is missing: {folder} is not a "
                              "complete checkpoint.")
    common = _load(common_file)
    if not isinstance(common, dict) or "world_size" not in common:
        raise CheckpointError(f"checkpoint file {common_file} is not a checkpoint's common.pt.")
    fmt = common.get("format")
    if fmt not in _READS:
        raise ValueError(f"{folder} has checkpoint format {fmt!r}; this version reads formats "
                         f"{list(_READS)}.")
    if fmt >= 2 and not checked:
        verify_file(common_file)  # raises: the checksum file is missing
    for r in range(int(common["world_size"])):
        rank_file = _rank_file(folder, r)
        if fmt >= 2:
            verify_file(rank_file)
        elif not rank_file.is_file():
            raise CheckpointError(f"checkpoint {folder} has no {rank_file.name}: on several machines "
                                  "put train.checkpoint.dir on storage every node sees.")
    return common


def _restore(folder: Path, common: dict[str, Any], *, rank: int,
             world_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    saved = int(common["world_size"])
    if saved == world_size:
        return common, _load(_rank_file(folder, rank))
    old = [_load(_rank_file(folder, r)) for r in range(saved)]
    return resize_rank_state(common, old, world_size=world_size, rank=rank, source=str(folder))
