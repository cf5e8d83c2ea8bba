"""``BlockSelection``'s two storages (bool mask / block lists) and the lists <-> bool conversion,
against plain loop references."""

from __future__ import annotations

import pytest
import torch

from prism.masks import BlockSelection, block_causal, block_mask_to_bool, selection_to_block_mask
from prism.masks.blockmask import bool_to_block_lists, lists_to_bool, selection_to_lists


def _random_selection(b, h, sq, sk, bs, seed=0, p=0.4):
    g = torch.Generator().manual_seed(seed)
    visible, part = block_causal(sq, sk, bs)
    m = (torch.rand(b, h, *visible.shape, generator=g) < p) & visible
    m[..., 0] = True
    return m | part


def _loop_lists_to_bool(num, idx, nkb):
    out = torch.zeros(*num.shape, nkb, dtype=torch.bool)
    for pos in torch.cartesian_prod(*[torch.arange(n) for n in num.shape]).tolist():
        pos = tuple(pos) if isinstance(pos, list) else (pos,)
        for e in range(int(num[pos])):
            out[pos + (int(idx[pos + (e,)]),)] = True
    return out


def test_lists_to_bool_matches_a_loop_with_narrow_rows_and_repeats():
    g = torch.Generator().manual_seed(1)
    nkb = 9
    num = torch.randint(0, 6, (2, 3, 4), generator=g, dtype=torch.int32)
    idx = torch.randint(0, nkb, (2, 3, 4, 6), generator=g, dtype=torch.int32)  # W=6 < NKB
    got = lists_to_bool(num, idx, nkb)
    assert got.shape == (2, 3, 4, nkb) and got.dtype == torch.bool
    assert torch.equal(got, _loop_lists_to_bool(num, idx, nkb))
    with pytest.raises(ValueError):
        lists_to_bool(num, idx[..., :2, :], nkb)


def test_bool_to_lists_round_trip_and_layout():
    m = _random_selection(2, 3, 700, 1000, 128)
    num, idx = bool_to_block_lists(m)
    assert num.dtype == idx.dtype == torch.int32
    for pos in [(0, 0, 3), (1, 2, 5)]:  # selected first ascending, then unselected ascending
        row = m[pos]
        sel = torch.nonzero(row).flatten().tolist()
        rest = torch.nonzero(~row).flatten().tolist()
        assert idx[pos].tolist() == sel + rest and int(num[pos]) == len(sel)
    assert torch.equal(lists_to_bool(num, idx, m.shape[-1]), m)


def test_mask_stored_selection_derives_lists_and_caches_the_block_mask():
    m = _random_selection(2, 3, 700, 1000, 128)
    sel = BlockSelection(m, 700, 1000, 128, info={"x": 1})
    assert sel.stored_as == "mask" and sel.mask is m and sel.info == {"x": 1}
    assert sel.shape == (2, 3, 6, 8) and sel.num_kv_blocks == 8
    visible, part = block_causal(700, 1000, 128)
    kv_num, kv_idx, full_num, full_idx = sel.lists
    assert torch.equal(lists_to_bool(kv_num, kv_idx, 8), m & part)
    assert torch.equal(lists_to_bool(full_num, full_idx, 8), m & ~part)
    bm = sel.block_mask()
    assert bm is sel.block_mask()  # built once
    for a, e in zip(block_mask_to_bool(bm), (m & part, m & ~part)):
        assert torch.equal(a, e)
    with pytest.raises(ValueError, match="made for"):
        sel.block_mask(600, 1000)


def test_list_stored_selection_expands_lazily_and_counts_from_lists():
    m = _random_selection(2, 3, 700, 1000, 128, seed=2)
    lists = selection_to_lists(m, 700, 1000, 128)
    sel = BlockSelection.from_lists(lists, 700, 1000, 128)
    assert sel.stored_as == "lists" and sel.shape == tuple(m.shape)
    visible, _ = block_causal(700, 1000, 128)
    want = (m & visible).sum(dim=(-2, -1)).float() / visible.sum()
    torch.testing.assert_close(sel.density_per_head(), want)
    assert sel.density == pytest.approx(float(want.mean()))
    assert torch.equal(sel.num_selected(), (m & visible).sum(-1, dtype=torch.int32))
    assert sel._mask is None  # statistics never expanded the lists
    assert sel.block_mask().kv_num_blocks is lists[0]  # the lists themselves, no rebuild
    assert torch.equal(sel.mask, m)
    assert sel.mask is sel.mask  # cached
    with pytest.raises(AttributeError):
        sel.mask = m


def test_narrow_lists_expand_correctly():
    m = _random_selection(1, 2, 512, 512, 128, seed=3)
    kn, ki, fn, fi = selection_to_lists(m, 512, 512, 128)
    wk, wf = int(kn.max()), int(fn.max())
    sel = BlockSelection.from_lists((kn, ki[..., :wk], fn, fi[..., :wf]), 512, 512, 128)
    assert torch.equal(sel.mask, m)


def test_statistics_agree_between_storages_and_combinators_work():
    a = _random_selection(2, 2, 300, 900, 64, seed=4, p=0.3)
    b = _random_selection(2, 2, 300, 900, 64, seed=5, p=0.3)
    sa = BlockSelection(a, 300, 900, 64)
    sb = BlockSelection.from_lists(selection_to_lists(b, 300, 900, 64), 300, 900, 64)
    assert sa.density == pytest.approx(BlockSelection.from_lists(sa.lists, 300, 900, 64).density)
    assert torch.equal((sa | sb).mask, a | b) and torch.equal((sa & sb).mask, a & b)
    assert torch.equal((sb | sa).mask, a | b)
    other = BlockSelection(_random_selection(2, 2, 300, 960, 64), 300, 960, 64)
    with pytest.raises(ValueError, match="cannot combine"):
        sa | other


def test_block_mask_from_either_storage_is_the_same():
    m = _random_selection(1, 4, 1000, 1000, 128, seed=6)
    ref = block_mask_to_bool(selection_to_block_mask(m, 1000, 1000, 128))
    for sel in (
        BlockSelection(m, 1000, 1000, 128),
        BlockSelection.from_lists(selection_to_lists(m, 1000, 1000, 128), 1000, 1000, 128),
    ):
        for got, exp in zip(block_mask_to_bool(sel.block_mask()), ref):
            assert torch.equal(got, exp)


def test_constructors_validate():
    m = _random_selection(1, 1, 256, 256, 128)
    with pytest.raises(ValueError, match="bool tensor"):
        BlockSelection(m.int(), 256, 256, 128)
    with pytest.raises(ValueError, match="block grid"):
        BlockSelection(m, 256, 512, 128)
    kn, ki, fn, fi = selection_to_lists(m, 256, 256, 128)
    with pytest.raises(ValueError, match="lists must be"):
        BlockSelection.from_lists((kn, ki, fn[..., :1], fi), 256, 256, 128)
    with pytest.raises(ValueError, match="integer"):
        BlockSelection.from_lists((kn, ki.float(), fn, fi), 256, 256, 128)
    with pytest.raises(ValueError, match="block grid"):
        BlockSelection.from_lists((kn, ki, fn, fi), 512, 512, 128)
