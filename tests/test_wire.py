"""The wire format: both index formats round-trip every pair exactly, and the sizes are as documented."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dgc import DGCConfig
from dgc.wire import BLOCK, BucketLayout, MessageView, index_blocks, pack_pairs, unpack_positions


def _layout(numels: list[int], ks: list[int], fmt: str, dtype: torch.dtype = torch.float32) -> BucketLayout:
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    return BucketLayout(
        names=tuple(f"t{i}" for i in range(len(numels))),
        offsets=tuple(offsets),
        numels=tuple(numels),
        ks=tuple(ks),
        wire_dtype=dtype,
        index_blocks=index_blocks(fmt, sum(numels), sum(ks)),
    )


def _messages(layout: BucketLayout, per_rank: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    raw = torch.zeros(len(per_rank) * layout.message_bytes, dtype=torch.uint8)
    for r, (pos, val) in enumerate(per_rank):
        row = raw[r * layout.message_bytes : (r + 1) * layout.message_bytes]
        view = MessageView.of(row, layout)
        pack_pairs(layout, view, pos.clone(), val.clone())
    return raw


def test_block16_round_trips_the_positions_at_every_bit_boundary() -> None:
    numel = 5 * BLOCK + 17
    pos = torch.tensor([0, 1, 32767, 32768, 65535, 65536, 65537, 2 * BLOCK + 40000, numel - 1], dtype=torch.int32)
    layout = _layout([numel], [pos.numel()], "block16")
    assert layout.index_blocks == 6 and layout.index_format == "block16"
    shuffled = pos[torch.randperm(pos.numel())]
    vals = shuffled.float() * 0.5 + 1.0
    raw = _messages(layout, [(shuffled, vals)])
    view = MessageView.of(raw, layout, 1)
    got = unpack_positions(layout, view, 1)[0]
    assert got.dtype == torch.int32
    assert got.tolist() == pos.tolist()  # sorted on the wire
    torch.testing.assert_close(view.values[0], pos.float() * 0.5 + 1.0, rtol=0, atol=0)
    assert view.counts[0].tolist() == [5, 2, 1, 0, 0, 1]


@settings(max_examples=60, deadline=None)
@given(
    numels=st.lists(st.integers(1, 3 * BLOCK), min_size=1, max_size=4),
    world=st.integers(1, 4),
    fmt=st.sampled_from(["int32", "block16", "auto"]),
    half=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_pair_survives_the_wire(numels: list[int], world: int, fmt: str, half: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ks = [max(1, n // 997) for n in numels]
    dtype = torch.float16 if half else torch.float32
    layout = _layout(numels, ks, fmt, dtype)
    per_rank, want = [], []
    for _ in range(world):
        pos = torch.cat([
            torch.randperm(n, generator=gen)[:k] + off
            for n, k, off in zip(layout.numels, layout.ks, layout.offsets, strict=True)
        ]).to(torch.int32)
        val = torch.randn(pos.numel(), generator=gen).to(dtype)
        per_rank.append((pos, val))
        want.append(dict(zip(pos.tolist(), val.tolist(), strict=True)))
    raw = _messages(layout, per_rank)
    view = MessageView.of(raw, layout, world)
    got = unpack_positions(layout, view, world)
    assert got.shape == (world, layout.pairs)
    for r in range(world):
        assert dict(zip(got[r].tolist(), view.values[r].tolist(), strict=True)) == want[r]


def test_message_sizes_are_the_documented_ones() -> None:
    # int32: 4 (flags) + 4K + wK + wD, padded to 8.
    lay = _layout([4000, 10], [4, 0], "int32")
    assert lay.dense_numel == 10 and lay.message_bytes == (4 + 16 + 16 + 40 + 7) // 8 * 8
    # block16: 4 + 4B + 2K padded to 4 + wK + wD, padded to 8.
    numel, k = 25_557_032, 25_557  # a ResNet-50-sized bucket at density 0.001
    lay = _layout([numel], [k], "block16")
    b = -(-numel // BLOCK)
    assert lay.index_blocks == b == 390
    idx = 4 * b + (2 * k + 3) // 4 * 4
    assert lay.index_bytes == idx
    assert lay.message_bytes == (4 + idx + 4 * k + 7) // 8 * 8
    # About 6 bytes per float32 pair instead of 8.
    assert 6.0 < lay.message_bytes / k < 6.1


def test_auto_takes_the_smaller_message() -> None:
    for numels, ks in [([4000], [4]), ([100_000], [2]), ([100_000], [3]), ([25_000_000], [25_000]), ([70_000], [1])]:
        auto = _layout(numels, ks, "auto")
        sizes = {f: _layout(numels, ks, f).message_bytes for f in ("int32", "block16")}
        assert auto.message_bytes == min(sizes.values()), (numels, ks, sizes)
    assert _layout([25_000_000], [25_000], "auto").index_format == "block16"
    assert _layout([3000], [3], "auto").index_format == "int32"  # a tie (4 + 8 = 12 bytes) keeps int32
    assert _layout([100, 5], [0, 0], "block16").index_blocks == 0  # nothing sparse: nothing to index


def test_config_rejects_unknown_index_format() -> None:
    with pytest.raises(ValueError, match="index_format"):
        DGCConfig(index_format="int16")
    assert DGCConfig().index_format == "auto"


@pytest.mark.parametrize("fmt", ["block16", "bitmap"])
def test_a_share_indexes_its_own_range_only(fmt: str) -> None:
    """A share (``hierarchy="node"``) starting deep in its bucket: positions travel relative to
    ``index_base``, come back absolute, and the index is the size of the share's range, not the bucket's."""
    base, numels = 3 * BLOCK + 123, [BLOCK + 7, 2 * BLOCK]
    offsets = (base, base + numels[0])
    ks = [300, 500]
    end = base + sum(numels)

    def share(index_base: int) -> BucketLayout:
        return BucketLayout(names=("a", "b"), offsets=offsets, numels=tuple(numels), ks=tuple(ks),
                            wire_dtype=torch.float32, index_base=index_base,
                            index_blocks=index_blocks(fmt, end - index_base, sum(ks)))

    layout, whole = share(base), share(0)
    saved = whole.index_bytes - layout.index_bytes
    def bitmap(n: int) -> int:  # bytes of n bits, padded to 4
        return (-(-n // 8) + 3) // 4 * 4

    assert saved == (4 * 3 if fmt == "block16" else bitmap(end) - bitmap(end - base))  # 7 -> 4 blocks
    gen = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.randperm(n, generator=gen)[:k] + o for n, k, o in zip(numels, ks, offsets, strict=True)])
    pos = pos.to(torch.int32)
    # the first and last element of the share travel too
    pos[0], pos[-1] = base, end - 1
    val = torch.randn(pos.numel(), generator=gen)
    view = MessageView.of(_messages(layout, [(pos, val)]), layout, 1)
    got = unpack_positions(layout, view, 1)[0]
    assert got.tolist() == sorted(pos.tolist())
    assert dict(zip(got.tolist(), view.values[0].tolist(), strict=True)) == dict(
        zip(pos.tolist(), val.tolist(), strict=True))
