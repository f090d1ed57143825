"""Checkpoint files: checksums, corrupt/partial files named, fall back to the newest intact folder,
resume on another world size (per-rank states redistributed), ``train.resume=auto``."""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dgc
from dgc.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resume_source,
    save_checkpoint,
    verify_file,
)
from dgc.training.rng import get_rng_state, seed_everything


def _save(root: Path, step: int, per_rank: list[dict], common: dict | None = None) -> Path:
    """save_checkpoint as the loop calls it, one thread per rank (it is collective)."""
    world_size = len(per_rank)
    common = {"epoch": 0, "batch": 3, "world_size": world_size, "model": {}, "optimizer": {},
              "scheduler": {}, "comm": "none", "config": "seed: 5\ntrain:\n  batch_size: 4\n",
              **(common or {})}
    barrier = threading.Barrier(world_size)
    errors: list[BaseException] = []
    out: list[Path] = []

    def save(rank: int) -> None:
        try:
            out.append(save_checkpoint(root, step, rank=rank, common=common, per_rank=per_rank[rank],
                                       barrier=barrier.wait))
        except BaseException as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=save, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    return out[0]


def _two_checkpoints(root: Path) -> tuple[Path, Path]:
    old = _save(root, 4, [{"rank": 0, "at": 4}, {"rank": 1, "at": 4}])
    new = _save(root, 8, [{"rank": 0, "at": 8}, {"rank": 1, "at": 8}])
    return old, new


def test_every_file_has_a_sha256sum_checksum(tmp_path):
    folder = _save(tmp_path, 1, [{"rank": 0}, {"rank": 1}])
    for name in ("common.pt", "rank-00000.pt", "rank-00001.pt"):
        digest, listed = (folder / f"{name}.sha256").read_text().split()
        assert listed == name
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        verify_file(folder / name)
        torch.load(folder / name, weights_only=True)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, lambda p: p.write_bytes(b"garbage"),
                                    lambda p: p.unlink()])
@pytest.mark.parametrize("name", ["common.pt", "rank-00001.pt"])
def test_a_damaged_file_is_named_and_the_previous_checkpoint_loads(tmp_path, caplog, damage, name):
    old, new = _two_checkpoints(tmp_path)
    damage(new / name)
    with caplog.at_level(logging.WARNING, logger="dgc.training.checkpoint"):
        for rank in (0, 1):  # both ranks pick the same folder, though only one file is damaged
            common, mine = load_checkpoint(tmp_path, rank=rank, world_size=2)
            assert common["step"] == 4 and mine == {"rank": rank, "at": 4}
    assert str(new / name) in caplog.text
    assert f"resuming from {old}, the newest intact checkpoint" in caplog.text


def test_an_explicitly_named_damaged_folder_falls_back_to_an_older_one(tmp_path):
    _, new = _two_checkpoints(tmp_path)
    _flip_a_byte(new / "rank-00000.pt")
    common, _ = load_checkpoint(new, rank=0, world_size=2)
    assert common["step"] == 4


def test_no_intact_checkpoint_is_a_clear_error_naming_every_file(tmp_path):
    old, new = _two_checkpoints(tmp_path)
    _truncate(new / "rank-00000.pt")
    (old / "common.pt").write_bytes(b"\x00" * 100)
    (old / "common.pt.sha256").unlink()  # no checksum either: the file itself must be read
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, rank=0, world_size=2)
    text = str(info.value)
    assert str(new / "rank-00000.pt") in text and "corrupt or partial" in text
    assert str(old / "common.pt") in text
    assert "weights_only=False will likely succeed" not in text


def test_a_checkpoint_without_checksums_still_loads(tmp_path):
    """Format 1 (before checksums): files without .sha256 load as before."""
    folder = _save(tmp_path, 2, [{"rank": 0}])
    common = torch.load(folder / "common.pt", weights_only=True)
    torch.save({**common, "format": 1}, folder / "common.pt")
    for side in folder.glob("*.sha256"):
        side.unlink()
    common, mine = load_checkpoint(tmp_path, rank=0, world_size=1)
    assert common["format"] == 1 and mine == {"rank": 0}


def test_resume_source(tmp_path):
    assert resume_source(None, tmp_path) is None
    assert resume_source("some/folder", None) == "some/folder"
    assert resume_source("auto", tmp_path / "ckpt") is None  # first attempt: nothing yet
    _save(tmp_path / "ckpt", 1, [{"rank": 0}])
    assert resume_source("auto", tmp_path / "ckpt") == str(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="train.resume = auto needs train.checkpoint.dir"):
        resume_source("auto", None)


# ---------------------------------------------------------------- another world size
CONFIG = dgc.DGCConfig(density=0.1, momentum=0.9, dense_steps=0, min_compress_numel=1)


def _dgc_states(n: int) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    out = []
    for rank in range(n):
        state = dgc.DGCState(CONFIG, model.named_parameters())
        for m in state.memory.values():
            m.residual.normal_()
            m.momentum.normal_()
        state.step = 7
        sd = state.state_dict()
        sd.update(world_size=n, rank=rank)
        out.append(sd)
    return out


def _per_rank(n: int) -> list[dict]:
    states = _dgc_states(n)
    out = []
    for rank in range(n):
        seed_everything(100 + rank)
        out.append({
            "comm": {"name": "dgc", "dgc": states[rank]}, "rng": get_rng_state(),
            "meter": {"loss_sum": 1.5 + rank, "correct": 5 + rank, "count": 12},
            "epoch_traffic": {"steps": 3, "bytes_sent": 10 + rank}, "run_traffic": {"steps": 7},
            "epoch_seconds": 2.0 + rank, "run_seconds": 9.0 + rank,
        })
    return out


@pytest.mark.parametrize("new", [1, 3])
def test_resume_on_another_world_size_redistributes_the_per_rank_state(tmp_path, new, caplog):
    old = _per_rank(2)
    _save(tmp_path, 7, old, common={"comm": "dgc", "batch": 3})
    with caplog.at_level(logging.INFO, logger="dgc.training"):
        loaded = [load_checkpoint(tmp_path, rank=r, world_size=new) for r in range(new)]
    assert f"written by 2 ranks, on {new} ranks" in caplog.text
    for common, _ in loaded:
        assert common["step"] == 7 and common["world_size"] == new
        assert common["batch"] == 3 * 2 // new  # the samples done so far: 3 batches x 2 ranks
    mine = [m for _, m in loaded]
    # DGC: the mean over workers of residual and momentum is unchanged; each rank's state loads
    for name in ("weight", "bias"):
        for key in ("residual", "momentum"):
            before = sum(o["comm"]["dgc"][name][key].double() for o in old) / 2
            after = sum(m["comm"]["dgc"][name][key].double() for m in mine) / new
            torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-7)
    assert [m["comm"]["dgc"]["rank"] for m in mine] == list(range(new))
    assert all(m["comm"]["dgc"]["world_size"] == new and m["comm"]["dgc"]["step"] == 7 for m in mine)
    if new == 1:
        state = dgc.DGCState(CONFIG, nn.Linear(6, 5).named_parameters())
        state.load_state_dict(mine[0]["comm"]["dgc"])
        assert state.step == 7
    # the epoch's loss/accuracy sums are exact once summed over the new ranks
    assert sum(m["meter"]["count"] for m in mine) == 24
    assert sum(m["meter"]["correct"] for m in mine) == 11
    assert sum(m["meter"]["loss_sum"] for m in mine) == pytest.approx(4.0)
    # random streams: old ranks continue theirs, a new rank gets its own fresh one
    assert torch.equal(mine[0]["rng"]["torch"], old[0]["rng"]["torch"])
    if new == 3:
        assert torch.equal(mine[1]["rng"]["torch"], old[1]["rng"]["torch"])
        fresh = mine[2]["rng"]["torch"]
        assert not any(torch.equal(fresh, o["rng"]["torch"]) for o in old)
        seed_everything(5 + 1 + 2)  # what a fresh run gives rank 2 (config seed 5)
        assert torch.equal(fresh, torch.get_rng_state())
    # one worker's view (traffic, time): old rank r's, rank 0's for a new rank
    assert [m["run_seconds"] for m in mine] == [9.0, 10.0, 9.0][:new]


def test_per_rank_state_without_a_resize_rule_is_refused(tmp_path):
    old = [{"comm": {"name": "powersgd", "error": {"0": torch.full((3,), float(r))}}} for r in range(2)]
    _save(tmp_path, 3, old, common={"comm": "powersgd"})
    with pytest.raises(ValueError, match=r"written by 2 ranks and this run has 1, but compress=powersgd"):
        load_checkpoint(tmp_path, rank=0, world_size=1)
    common, mine = load_checkpoint(tmp_path, rank=1, world_size=2)  # same world size: as saved
    assert torch.equal(mine["comm"]["error"]["0"], torch.ones(3))
