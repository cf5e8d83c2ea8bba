"""prism.stats and prism.policy without transformers: counters, batch > 1, collect_stats."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from prism.masks import BlockSelection
from prism.policy import PrismPolicy, default_policy, reset_default_policy
from prism.stats import PrismStats, collect_stats

BS = 32


def _visible(sq: int, sk: int, bs: int) -> list[list[bool]]:
    """visible[i][j]: some query of block i may see some key of block j (written out)."""
    p = sk - sq
    nqb, nkb = math.ceil(sq / bs), math.ceil(sk / bs)
    return [[j * bs <= p + min((i + 1) * bs, sq) - 1 for j in range(nkb)] for i in range(nqb)]


def _random_selection(b=2, h=4, sq=160, sk=224, seed=0) -> BlockSelection:
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = math.ceil(sq / BS), math.ceil(sk / BS)
    mask = torch.rand(b, h, nqb, nkb, generator=g) < 0.5
    mask &= torch.tensor(_visible(sq, sk, BS))
    return BlockSelection(mask, sq, sk, BS)


def _row_density(sel: BlockSelection, row: int) -> float:
    """Selected visible blocks / visible blocks over the heads of one batch row (loops)."""
    vis = _visible(sel.q_len, sel.kv_len, sel.block_size)
    chosen = total = 0
    for h in range(sel.mask.shape[1]):
        for i, line in enumerate(vis):
            for j, v in enumerate(line):
                total += v
                chosen += v and bool(sel.mask[row, h, i, j])
    return chosen / total


def _row_recall(q, k, sel: BlockSelection, row: int) -> float:
    """Mean over heads and queries of the causal softmax mass inside the selected blocks."""
    sq, sk, bs = sel.q_len, sel.kv_len, sel.block_size
    g = q.shape[1] // k.shape[1]
    shares = []
    for h in range(q.shape[1]):
        s = q[row, h].double() @ k[row, h // g].double().T / math.sqrt(q.shape[-1])
        for t in range(sq):
            keys = torch.arange(sk) <= t + (sk - sq)
            p = torch.softmax(s[t].masked_fill(~keys, float("-inf")), -1)
            inside = sel.mask[row, h, t // bs][torch.arange(sk) // bs]
            shares.append(float(p[inside].sum()))
    return sum(shares) / len(shares)


def test_batch_of_two_density_is_the_mean_of_the_rows():
    sel = _random_selection()
    per_row = [_row_density(sel, r) for r in range(2)]
    assert per_row[0] != per_row[1]
    st = PrismStats()
    st.record_sparse(3, sel, None, None, None)
    assert st.density[3] == pytest.approx(sum(per_row) / 2, abs=1e-12)
    assert st.layers[3].calls == st.layers[3].sparse_calls == 1


def test_batch_of_two_recall_is_the_mean_of_the_rows():
    sel = _random_selection(sq=96, sk=96, seed=1)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 96, 16, generator=g)
    k = torch.randn(2, 2, 96, 16, generator=g)
    st = PrismStats(recall=[0])
    st.record_sparse(0, sel, q, k, None)
    st.record_sparse(1, sel, q, k, None)  # not asked for
    expected = sum(_row_recall(q, k, sel, r) for r in range(2)) / 2
    assert set(st.recall) == {0}
    assert st.recall[0] == pytest.approx(expected, abs=1e-5)


def test_rows_recorded_piecewise_add_up():
    """A padded batch records one call and one selection per row (``new_call=False``)."""
    a, b = _random_selection(b=1, sq=128, sk=128, seed=3), _random_selection(b=1, seed=4)
    st = PrismStats()
    st.record_call(0, sparse=True)
    st.record_sparse(0, a, None, None, None, new_call=False)
    st.record_sparse(0, b, None, None, None, new_call=False)
    st.record_dense(0, "decode")
    st.record_dense(None, "short")
    s = st.layers[0]
    assert (s.calls, s.sparse_calls, dict(s.dense_calls)) == (2, 1, {"decode": 1})
    vis = [sum(map(sum, _visible(x.q_len, x.kv_len, BS))) * 4 for x in (a, b)]
    chosen = [_row_density(x, 0) * n for x, n in zip((a, b), vis)]
    assert s.density == pytest.approx(sum(chosen) / sum(vis), abs=1e-12)
    assert st.layers[-1].dense_calls == {"short": 1} and -1 not in st.density
    assert st.overall_density == pytest.approx(s.density)


def test_deferred_recall_waits_until_read():
    sel = _random_selection(b=1, sq=64, sk=64, seed=5)
    q = torch.randn(1, 4, 64, 16)
    k = torch.randn(1, 2, 64, 16)
    expected = _row_recall(q, k, sel, 0)
    st = PrismStats(recall=True, defer_recall=True)
    st.record_sparse(0, sel, q, k, None)
    q.zero_()  # the stats kept their own copy
    assert st.pending_recalls == 1 and st.layers[0].recall is None
    assert st.recall[0] == pytest.approx(expected, abs=1e-5)
    assert st.pending_recalls == 0


def test_collect_stats_attaches_and_restores():
    class Holder:  # anything carrying a policy, as patch_model leaves a model
        _prism_policy = PrismPolicy("prism", "reference", block_size=BS)

    pol = Holder._prism_policy
    with collect_stats(Holder()) as st:
        assert pol.stats is st
        with collect_stats(pol, recall=[2]) as inner:
            assert pol.stats is inner and inner.wants_recall(2) and not inner.wants_recall(1)
        assert pol.stats is st
    assert pol.stats is None
    try:
        with collect_stats() as st:  # no model: the default policy
            assert default_policy().stats is st
        with collect_stats(object()) as st:  # no policy on it: the default policy too
            assert default_policy().stats is st
        assert default_policy().stats is None
    finally:
        reset_default_policy()


def test_policy_and_stats_need_no_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import prism\n"
        "from prism.policy import PrismPolicy\n"
        "from prism.stats import PrismStats, collect_stats\n"
        "assert prism.PrismPolicy is PrismPolicy and prism.collect_stats is collect_stats\n"
        "assert prism.PrismStats is PrismStats\n"
        "pol = PrismPolicy('prism', 'reference', block_size=32, dense_layers=1)\n"
        "assert pol.scorer_for(0) is None\n"
        "with collect_stats(pol) as st: assert pol.stats is st\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_lazy_names_come_from_the_neutral_modules():
    import prism.policy
    import prism.stats

    assert prism.PrismPolicy is prism.policy.PrismPolicy
    assert prism.collect_stats is prism.stats.collect_stats
