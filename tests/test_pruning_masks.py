"""Mask structure of every pruning granularity, checked exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dgc.pruning import NM, BankBalanced, Block, Channel, Unstructured
from dgc.pruning.bank_balanced import effective_bank_size
from dgc.pruning.granularity import count_to_prune, prune_lowest


def _w(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mask(g, w, s, prev=None):
    return g.compute_masks({"w": w}, s, None if prev is None else {"w": prev})["w"]


# ---------------------------------------------------------------- unstructured
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 20), s=st.floats(0, 0.99),
       seed=st.integers(0, 99))
def test_unstructured_prunes_exact_count_of_smallest(rows, cols, s, seed):
    w = _w(rows, cols, seed=seed)
    m = _mask(Unstructured(), w, s)
    assert m.dtype == torch.bool and m.shape == w.shape
    n_pruned = int((~m).sum())
    assert n_pruned == count_to_prune(s, w.numel())
    if 0 < n_pruned < w.numel():  # every pruned |w| <= every kept |w|
        assert w.abs()[~m].max() <= w.abs()[m].min()


def test_unstructured_ties_broken_by_index_order():
    w = torch.ones(2, 4)
    m = _mask(Unstructured(), w, 0.5)
    assert m.flatten().tolist() == [False] * 4 + [True] * 4
    assert prune_lowest(torch.zeros(5), 2).tolist() == [False, False, True, True, True]


def test_global_unstructured_one_ranking_across_layers():
    small = torch.full((4, 4), 0.1) + torch.arange(16).view(4, 4) * 1e-3
    big = torch.full((4, 4), 10.0) + torch.arange(16).view(4, 4) * 1e-3
    masks = Unstructured(scope="global").compute_masks({"a": small, "b": big}, 0.5)
    assert not masks["a"].any() and masks["b"].all()
    layer = Unstructured(scope="layer").compute_masks({"a": small, "b": big}, 0.5)
    assert int((~layer["a"]).sum()) == 8 and int((~layer["b"]).sum()) == 8


def test_previously_pruned_entries_stay_pruned():
    w = _w(8, 8)
    prev = _mask(Unstructured(), w, 0.3)
    w2 = w.clone()
    w2[~prev] = 0
    w2[prev] *= 0.0  # everything kept is now zero too: ties everywhere
    m = _mask(Unstructured(), w2, 0.5, prev)
    assert not (m & ~prev).any()  # nothing revived
    assert torch.equal(_mask(Unstructured(), w2, 0.3, prev), prev)  # idempotent


# ---------------------------------------------------------------- block
@pytest.mark.parametrize("shape,block", [((16, 32), (4, 4)), ((10, 7), (4, 4)),
                                         ((8, 3, 3, 3), (2, 9)), ((12, 12), (1, 4))])
def test_block_masks_constant_per_block(shape, block):
    w = _w(*shape)
    m = _mask(Block(block_shape=block), w, 0.6).reshape(shape[0], -1).float()
    rows, cols = m.shape
    bh, bw = block
    n_blocks = 0
    pruned_blocks = 0
    for r in range(0, rows, bh):
        for c in range(0, cols, bw):
            tile = m[r:r + bh, c:c + bw]
            assert tile.min() == tile.max(), "a tile mixes kept and pruned entries"
            n_blocks += 1
            pruned_blocks += int(tile.max() == 0)
    if rows % bh == 0 and cols % bw == 0:  # full tiles: the nearest whole number of tiles
        assert pruned_blocks == count_to_prune(0.6, n_blocks)
    # Edge tiles are smaller: counted in entries, within half a full tile of the target.
    assert abs(int((m == 0).sum()) - 0.6 * m.numel()) <= bh * bw / 2


def test_block_gradual_never_revives_and_is_idempotent():
    w = _w(10, 7)
    g = Block(block_shape=(4, 4))
    prev = None
    for s in (0.2, 0.35, 0.5, 0.8):
        m = _mask(g, w, s, prev)
        if prev is not None:
            assert not (m & ~prev).any()
        w = w * m * 0.7  # every kept weight shrinks: the order changes, the prefix must not
        assert torch.equal(_mask(g, w, s, m), m)
        prev = m


def test_block_prunes_lowest_mean_tiles():
    w = torch.ones(4, 8)
    w[:, 4:] = 0.01  # right tile has the lower mean |w|
    m = _mask(Block(block_shape=(4, 4)), w, 0.5)
    assert m[:, :4].all() and not m[:, 4:].any()


# ---------------------------------------------------------------- bank-balanced
def _largest_kept_per_bank(w: torch.Tensor, m: torch.Tensor, bank: int) -> None:
    """Within each bank the kept entries are its largest |w|."""
    wa = w.abs().reshape(-1, bank)
    mb = m.reshape(-1, bank)
    for i in range(wa.shape[0]):
        kept, pruned = wa[i][mb[i]], wa[i][~mb[i]]
        if kept.numel() and pruned.numel():
            assert pruned.max() <= kept.min()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), banks=st.integers(1, 6), bank=st.integers(2, 16),
       s=st.floats(0, 0.99), seed=st.integers(0, 99))
def test_bank_balanced_row_mode_banks_of_a_row_equal_and_layer_on_target(rows, banks, bank, s,
                                                                          seed):
    w = _w(rows, banks * bank, seed=seed)
    m = _mask(BankBalanced(bank_size=bank), w, s)
    pruned = (~m).reshape(rows, banks, bank).sum(-1)  # (rows, banks)
    assert (pruned == pruned[:, :1]).all(), "banks of one row prune different counts"
    per_row = pruned[:, 0]
    assert int(per_row.max() - per_row.min()) <= 1
    # The layer total: one entry per bank of a row at a time, nearest to s * numel.
    assert int(per_row.sum()) == count_to_prune(s, rows * bank)
    assert abs(int((~m).sum()) / w.numel() - s) <= 1 / (2 * rows * bank) + 1e-9
    _largest_kept_per_bank(w, m, bank)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), banks=st.integers(1, 6), bank=st.integers(2, 16),
       s=st.floats(0, 0.99))
def test_bank_balanced_layer_mode_every_bank_same_count(rows, banks, bank, s):
    w = _w(rows, banks * bank)
    m = _mask(BankBalanced(bank_size=bank, balance="layer"), w, s)
    per_bank = m.reshape(rows, banks, bank).sum(-1)
    assert (per_bank == bank - count_to_prune(s, bank)).all()
    _largest_kept_per_bank(w, m, bank)


def test_bank_balanced_row_mode_reaches_90_percent_where_layer_mode_gives_87_5():
    w = _w(128, 3136)  # the loop's CNN hidden layer; banks of 16
    row = _mask(BankBalanced(bank_size=16), w, 0.9)
    layer = _mask(BankBalanced(bank_size=16, balance="layer"), w, 0.9)
    assert 1 - layer.float().mean().item() == 0.875
    assert abs(1 - row.float().mean().item() - 0.9) <= 1 / (2 * 128 * 16)
    # The extra entry per bank goes to the rows where it costs least.
    w = torch.ones(4, 8)
    w[2] = 0.5
    m = _mask(BankBalanced(bank_size=4), w, 0.3)  # round(0.3 * 16) = 5 = 4 rows x 1 + 1 extra
    assert (~m).sum(1).tolist() == [2, 2, 4, 2]


def test_bank_balanced_row_mode_agp_never_revives_and_is_idempotent():
    w = _w(16, 48)
    g = BankBalanced(bank_size=16)
    prev = None
    for s in (0.3, 0.5, 0.51, 0.52, 0.7, 0.9):
        m = _mask(g, w, s, prev)
        if prev is not None:
            assert not (m & ~prev).any(), f"a pruned weight was revived at {s}"
        w = w * m * 1.3 + _w(16, 48, seed=int(100 * s)) * 0.1 * m  # training moves kept weights
        assert torch.equal(_mask(g, w, s, m), m)  # recomputing at the same target: no change
        prev = m


def test_bank_balanced_conv_and_non_dividing_rows():
    w = _w(6, 3, 3, 3)  # rows of 27: bank 16 -> 9
    g = BankBalanced(bank_size=16)
    assert effective_bank_size(27, 16) == 9 and g.bank_size_for(w) == 9
    m = _mask(g, w, 0.9).reshape(6, 3, 9)
    pruned = (~m).sum(-1)
    assert (pruned == pruned[:, :1]).all() and int(pruned[:, 0].sum()) == round(0.9 * 6 * 9)
    layer = _mask(BankBalanced(bank_size=16, balance="layer"), w, 0.9).reshape(6, 3, 9)
    assert (layer.sum(-1) == 9 - count_to_prune(0.9, 9)).all()
    with pytest.raises(ValueError, match="bank_size"):
        BankBalanced(bank_size=16, strict=True).check("conv.weight", w)
    with pytest.raises(ValueError, match="bank_size"):
        BankBalanced(bank_size=1)
    with pytest.raises(ValueError, match="balance"):
        BankBalanced(balance="column")


# ---------------------------------------------------------------- N:M
@pytest.mark.parametrize("shape", [(8, 16), (4, 8, 3, 3), (3, 4, 1)])
def test_nm_every_group_has_exactly_two_zeros(shape):
    w = _w(*shape)
    m = _mask(NM(n=2, m=4), w, 0.5)
    groups = (m.movedim(1, -1) if m.dim() > 2 else m).reshape(-1, 4)
    assert ((~groups).sum(-1) == 2).all()
    wg = (w.movedim(1, -1) if w.dim() > 2 else w).reshape(-1, 4).abs()
    kept_min = wg.masked_fill(~groups, float("inf")).min(-1).values
    pruned_max = wg.masked_fill(groups, -1.0).max(-1).values
    assert (pruned_max <= kept_min).all()


def test_nm_groups_run_along_input_channels_of_convs():
    w = torch.zeros(1, 4, 1, 2)
    w[0, :, 0, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # kernel position 0: keep channels 0, 1
    w[0, :, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # kernel position 1: keep channels 2, 3
    m = _mask(NM(), w, 0.5)
    assert m[0, :, 0, 0].tolist() == [True, True, False, False]
    assert m[0, :, 0, 1].tolist() == [False, False, True, True]


def test_nm_gradual_steps_and_validation():
    w = _w(4, 8)
    m = _mask(NM(), w, 0.25)  # intermediate AGP target: 1 zero per group
    assert ((~m.reshape(-1, 4)).sum(-1) == 1).all()
    m = _mask(NM(), w, 0.5)
    assert ((~m.reshape(-1, 4)).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="at most 0.5"):  # not silently capped
        _mask(NM(), w, 0.9)
    with pytest.raises(ValueError, match="multiple of m=4"):
        NM().check("fc.weight", _w(4, 6))
    with pytest.raises(ValueError, match="0 <= n < m"):
        NM(n=4, m=4)


# ---------------------------------------------------------------- channel
@pytest.mark.parametrize("norm", [1, 2])
def test_channel_masks_whole_filters_by_norm(norm):
    w = _w(10, 4, 3, 3)
    w[3] *= 0.01
    w[7] *= 0.02
    m = _mask(Channel(norm=norm), w, 0.2)
    per_filter = m.reshape(10, -1)
    assert (per_filter.all(1) | ~per_filter.any(1)).all(), "a filter is partly pruned"
    assert [i for i in range(10) if not per_filter[i].any()] == [3, 7]


def test_channel_linear_rows():
    w = _w(6, 5)
    m = _mask(Channel(), w, 0.5)
    assert int((~m.all(1)).sum()) == 3 and (m.all(1) | ~m.any(1)).all()
