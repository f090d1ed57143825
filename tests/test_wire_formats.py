"""Index and value formats beyond int32/block16: the bitmap index and int8 values with per-tensor scales.

Every format round-trips every pair exactly, "auto" takes the smallest index, the sizes are the
documented ones, and training is bit-identical whatever the index format (2 real gloo ranks)."""

from __future__ import annotations

import pytest
import torch
from _dist import run_distributed
from ddp_workers import Scenario, run_scenario
from hypothesis import given, settings
from hypothesis import strategies as st

from dgc import DGCConfig
from dgc.wire import (
    BITMAP,
    BLOCK,
    BucketLayout,
    MessageView,
    dequantize_int8,
    index_blocks,
    int8_scale,
    pack_pairs,
    quantize_int8,
    unpack_positions,
    wire_values,
)

FORMATS = ("int32", "block16", "bitmap")


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


def test_bitmap_round_trips_positions_at_byte_and_word_edges() -> None:
    numel = 8 * 37 + 5  # not a multiple of 8 or 32
    pos = torch.tensor([0, 1, 7, 8, 15, 31, 32, 33, 255, 256, numel - 2, numel - 1], dtype=torch.int32)
    layout = _layout([numel], [pos.numel()], "bitmap")
    assert layout.index_blocks == BITMAP and layout.index_format == "bitmap"
    assert layout.index_bytes == (-(-numel // 8) + 3) // 4 * 4
    raw = torch.zeros(layout.message_bytes, dtype=torch.uint8)
    view = MessageView.of(raw, layout)
    shuffled = pos[torch.randperm(pos.numel(), generator=torch.Generator().manual_seed(0))]
    pack_pairs(layout, view, shuffled.clone(), shuffled.float() * 0.5 + 1.0)
    assert view.indices.dtype == torch.uint8
    assert int(sum(bin(b).count("1") for b in view.indices.tolist())) == pos.numel()  # K bits set
    assert view.indices[0].item() == 0b10000011  # positions 0, 1, 7: least significant bit first
    gathered = MessageView.of(raw, layout, 1)
    got = unpack_positions(layout, gathered, 1)[0]
    assert got.dtype == torch.int32 and got.tolist() == pos.tolist()  # sorted on the wire
    torch.testing.assert_close(gathered.values[0], pos.float() * 0.5 + 1.0, rtol=0, atol=0)


def _random_messages(layout: BucketLayout, world: int, gen: torch.Generator, int8: bool):
    raw = torch.zeros(world * layout.message_bytes, dtype=torch.uint8)
    want = []
    for r in range(world):
        view = MessageView.of(raw[r * layout.message_bytes : (r + 1) * layout.message_bytes], layout)
        pos_parts, val_parts, sent_parts = [], [], []
        for i, (n, k, off) in enumerate(zip(layout.numels, layout.ks, layout.offsets, strict=True)):
            x = torch.randn(k if k else n, generator=gen) * float(torch.rand((), generator=gen) * 10)
            if int8:
                scale = int8_scale(x)
                codes = quantize_int8(x, scale)
                view.scales[i] = scale
                sent = dequantize_int8(codes, scale)
                x = codes
            else:
                sent = x
            if k:
                pos_parts.append(torch.randperm(n, generator=gen)[:k] + off)
                val_parts.append(x)
                sent_parts.append(sent)
            else:
                start = sum(layout.dense_size(j) for j in range(i))
                view.dense[start : start + n] = x
                want_dense = sent
        pos = torch.cat(pos_parts).to(torch.int32)
        pack_pairs(layout, view, pos, torch.cat(val_parts))
        want.append((dict(zip(pos.tolist(), torch.cat(sent_parts).tolist(), strict=True)), want_dense))
    return raw, want


@settings(max_examples=60, deadline=None)
@given(
    numels=st.lists(st.integers(1, 3 * BLOCK), min_size=1, max_size=4),
    density=st.sampled_from([0.001, 0.05, 0.3, 1.0]),
    world=st.integers(1, 3),
    fmt=st.sampled_from(["int32", "block16", "bitmap", "auto"]),
    int8=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_pair_and_scale_survives_the_wire(numels, density, world, fmt, int8, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    numels = [*numels, 7]  # a dense tensor at the end (as a bias in a sparse bucket)
    ks = [max(1, int(density * n)) for n in numels[:-1]] + [0]
    layout = _layout(numels, ks, fmt, torch.int8 if int8 else torch.float32)
    assert layout.scale_count == (len(numels) if int8 else 0)
    raw, want = _random_messages(layout, world, gen, int8)
    view = MessageView.of(raw, layout, world)
    got = unpack_positions(layout, view, world)
    values, dense = wire_values(layout, view, world)
    assert got.shape == values.shape == (world, layout.pairs)
    for r in range(world):
        pairs, want_dense = want[r]
        assert dict(zip(got[r].tolist(), values[r].float().tolist(), strict=True)) == pairs
        assert dense[r].float().tolist() == want_dense.tolist()


def test_message_sizes_with_bitmap_and_int8() -> None:
    # bitmap: 4 (flags) + n/8 (every bucket element, 4010 bits = 502 bytes) padded to 4 + wK + wD,
    # padded to 8.
    lay = _layout([4000, 10], [1000, 0], "bitmap")
    assert lay.index_bytes == 504 and lay.message_bytes == (4 + 504 + 4 * 1010 + 7) // 8 * 8
    # int8: + one float32 scale per tensor, 1 byte per value.
    lay8 = _layout([4000, 10], [1000, 0], "bitmap", torch.int8)
    assert lay8.message_bytes == (4 + 504 + 4 * 2 + 1010 + 7) // 8 * 8
    # ResNet-50-sized bucket at density 0.001, int8: about 3 bytes per pair.
    numel, k = 25_557_032, 25_557
    lay = _layout([numel], [k], "auto", torch.int8)
    assert lay.index_format == "block16"
    assert 3.0 < lay.message_bytes / k < 3.1


def test_auto_takes_the_smallest_index() -> None:
    cases = [([4000], [4]), ([100_000], [3]), ([25_000_000], [25_000]), ([70_000], [1]), ([100_000], [6000]),
             ([100_000], [6300]), ([100_000], [25_000]), ([1000, 64], [250, 0]), ([3 * BLOCK + 5], [BLOCK])]
    for numels, ks in cases:
        auto = _layout(numels, ks, "auto")
        sizes = {f: _layout(numels, ks, f).index_bytes for f in FORMATS}
        assert auto.index_bytes == min(sizes.values()), (numels, ks, sizes)
    assert _layout([100_000], [25_000], "auto").index_format == "bitmap"  # density 1/4: 12.5 KB vs 51.6 KB
    assert _layout([100_000], [2000], "auto").index_format == "block16"  # density 1/50
    assert _layout([3000], [3], "auto").index_format == "int32"  # a tie with block16 keeps int32
    # Around density 1/16 block16 and bitmap cross: block16 = 4B + 2K, bitmap = n/8.
    n = 16 * BLOCK
    assert _layout([n], [n // 16 - 64], "auto").index_format == "block16"
    assert _layout([n], [n // 16 + 64], "auto").index_format == "bitmap"


def test_config_accepts_bitmap_and_rejects_unknown() -> None:
    assert DGCConfig(index_format="bitmap").index_format == "bitmap"
    with pytest.raises(ValueError, match="index_format.*bitmap"):
        DGCConfig(index_format="delta")


# --------------------------------------------------------------------------- 2 ranks, real DDP (gloo)
WARM = dict(density=0.01, momentum=0.9, min_compress_numel=16, dense_steps=1, warmup_steps=4,
            warmup_initial_density=0.25, warmup_stages=2)
RUNS = {f"{fmt}-{dtype}": dict(WARM, index_format=fmt, value_dtype=dtype)
        for dtype in ("float32", "int8") for fmt in ("auto", *FORMATS)}


def _scenarios_worker(rank: int, world: int, scenarios: list[Scenario]) -> list[dict]:
    return [run_scenario(rank, world, sc) for sc in scenarios]


@pytest.fixture(scope="module")
def format_runs() -> dict[str, list[dict]]:
    scenarios = [Scenario(model="conv", dgc=cfg, steps=6, bucket_cap_mb=0.05) for cfg in RUNS.values()]
    per_rank = run_distributed(_scenarios_worker, 2, scenarios, timeout=200)
    return {name: [r[i] for r in per_rank] for i, name in enumerate(RUNS)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_index_formats_train_bit_identically(format_runs, dtype: str) -> None:
    runs = {fmt: format_runs[f"{fmt}-{dtype}"] for fmt in ("auto", *FORMATS)}
    for fmt, results in runs.items():
        for r in results:
            assert r["errors"] == [], fmt
            assert r["max_rel_err"] < 1e-5, (fmt, r["max_rel_err"])
    for fmt in FORMATS:
        for a, b in zip(runs["auto"], runs[fmt], strict=True):
            for n, p in a["params"].items():
                assert torch.equal(p, b["params"][n]), f"{fmt}: {n} differs from auto"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_auto_sends_the_fewest_bytes_at_every_step(format_runs, dtype: str) -> None:
    stats = {fmt: format_runs[f"{fmt}-{dtype}"][0]["stats"] for fmt in ("auto", *FORMATS)}
    densities = [s["density"] for s in stats["auto"]]
    assert densities[1] == pytest.approx(0.25) and densities[-1] == pytest.approx(0.01)
    for step in range(1, len(densities)):  # step 0 is a dense allreduce
        sent = {fmt: s[step]["bytes_sent"] for fmt, s in stats.items()}
        assert sent["auto"] <= min(sent[f] for f in FORMATS), (step, sent)
        assert len({s[step]["elements_sent"] for s in stats.values()}) == 1
    warm, last = 1, len(densities) - 1
    assert stats["bitmap"][warm]["bytes_sent"] < stats["block16"][warm]["bytes_sent"]  # density 1/4
    assert stats["block16"][last]["bytes_sent"] < stats["bitmap"][last]["bytes_sent"]  # density 1/100
