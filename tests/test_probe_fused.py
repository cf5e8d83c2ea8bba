"""The fused probe estimator (``ProbeScorer(impl="triton")``, issue 11).

On CPU under Triton's interpreter (``tests/conftest.py`` switches it on without CUDA; fp32 / fp16,
<= ~1K tokens), on the GPU (marker ``gpu``) with bf16 and real lengths. Every case compares:

* launch 1 + normalisation (``probe_block_probs_fused``) with the float64 loop reference
  ``naive_probe.naive_probe_probs`` (written without prism's helpers);
* the fused block lists with the PyTorch path (``impl="torch"``: the chunked probe softmax, then
  ``masks.select``'s rule) — bool mask and all four lists, exactly, except rows whose decision
  sits within float rounding of the top-p boundary (counted, and bounded);
* NaN-poisoned list buffers are never read: every entry of the returned lists is a valid index.
"""

from __future__ import annotations

import math

import pytest
import torch
from naive_probe import naive_block_log_masses, naive_probe_probs

from prism.kernels.estimation import op
from prism.kernels.estimation.probe_op import (
    ProbeKernelParams,
    probe_block_log_masses,
    probe_block_probs_fused,
    probe_select_block_lists,
)
from prism.masks import BlockSelection, block_causal, bool_to_block_lists
from prism.scorers.probe import ProbeScorer, probe_block_probs, probe_layout, shares_probes

needs_interpreter = pytest.mark.skipif(
    not (op.triton_available() and op.interpreter_on()),
    reason="needs Triton's interpreter (TRITON_INTERPRET=1, no CUDA)",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _qk(b, hq, hkv, sq, sk, d, dtype=torch.float32, device="cpu", seed=0, structured=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    if structured:  # a few strong keys and a drifting direction: peaked, uneven block masses
        k[:, :, :: max(1, sk // 7)] *= 4.0
        q = q + 1.5 * k.repeat_interleave(hq // hkv, 1)[:, :, sk - sq :]
    return q.to(device, dtype), k.to(device, dtype)


def _lists_of(mask, sq, sk, bs):
    _, part = block_causal(sq, sk, bs, mask.device)
    return bool_to_block_lists(mask & part) + bool_to_block_lists(mask & ~part)


# (B, Hq, Hkv, Sq, Sk, D, BS, P, placement, scorer params)
CPU_CASES = {
    "ragged127": (1, 2, 1, 127, 127, 64, 32, 2, "ends", {}),
    "gqa_batch2_ragged300": (2, 8, 2, 300, 300, 32, 64, 2, "ends", {"threshold": 0.9}),
    "prefix_not_multiple": (1, 4, 2, 290, 700, 64, 64, 3, "uniform", {"threshold": 0.8}),
    "group3_len1000": (1, 6, 2, 1000, 1000, 64, 128, 2, "ends", {}),
    "mqa_group8_middle": (1, 8, 1, 400, 400, 16, 32, 1, "middle", {}),
    "last_probes_block16": (1, 2, 1, 333, 333, 32, 16, 4, "last", {"threshold": 0.9}),
    "single_query": (1, 4, 2, 1, 500, 64, 64, 2, "ends", {}),
    "top_k": (1, 4, 2, 600, 600, 32, 32, 2, "ends", {"rule": "top_k", "top_k": 3}),
    "min_prob": (1, 4, 2, 600, 600, 32, 32, 2, "ends", {"rule": "min_prob", "min_prob": 0.05}),
    "no_forced": (
        1, 4, 2, 500, 500, 32, 32, 2, "ends",
        {"force_sink": False, "force_diagonal": False, "threshold": 0.7},
    ),
    "threshold1_dense": (1, 4, 2, 300, 500, 32, 64, 2, "ends", {"threshold": 1.0}),
    "fp16": (1, 4, 2, 500, 500, 64, 64, 2, "ends", {"dtype": torch.float16}),
    # NKB > 64: the select kernel's causal tiers (narrow rows for early tiles, identity tails)
    "tiers_block16": (1, 2, 1, 1100, 1100, 16, 16, 2, "ends", {"threshold": 0.9}),
    "tiers_block16_prefix": (1, 2, 2, 600, 1100, 16, 16, 2, "ends", {}),
    # shared: block i's first probe is block i - 1's last (launch 2 reads it, launch 1 skips it)
    "shared_ragged127": (1, 2, 1, 127, 127, 64, 32, 2, "shared", {}),
    "shared_gqa_batch2_prefix": (2, 8, 2, 290, 700, 32, 64, 2, "shared", {"threshold": 0.9}),
    "shared_three_ragged_last": (1, 6, 2, 1025, 1025, 32, 64, 3, "shared", {"threshold": 0.85}),
    "shared_top_k_no_forced": (
        1, 4, 2, 600, 600, 32, 32, 2, "shared",
        {"rule": "top_k", "top_k": 3, "force_sink": False, "force_diagonal": False},
    ),
    "shared_single_query": (1, 4, 2, 1, 500, 64, 64, 2, "shared", {}),
    "shared_tiers_block16_prefix": (1, 2, 2, 600, 1100, 16, 16, 2, "shared", {}),
}  # fmt: skip


def _check_case(b, hq, hkv, sq, sk, d, bs, probes, placement, params, device, max_bad=0.01):
    params = dict(params)
    dtype = params.pop("dtype", torch.float32)
    q, k = _qk(b, hq, hkv, sq, sk, d, dtype, device)
    cfg = dict(block_size=bs, probes=probes, placement=placement, **params)
    torch_sel = ProbeScorer(impl="torch", **cfg).select(q, k)
    fused = ProbeScorer(impl="triton", **cfg)
    sel = fused.select(q, k)
    assert fused.last_path == "triton"
    assert sel.lists is not None  # list-stored: the kernel wrote the BlockMask lists
    # the lists are exactly those of its own mask (layout of bool_to_block_lists)
    mine = _lists_of(sel.mask, sq, sk, bs)
    for got, want in zip(sel.lists, mine):
        assert torch.equal(got.cpu(), want.cpu())
    # against the PyTorch path: identical except rows at the rule's rounding boundary
    bad_rows = (sel.mask != torch_sel.mask).any(-1)
    assert bad_rows.float().mean().item() <= max_bad, int(bad_rows.sum())
    return q, k, sel, torch_sel


@needs_interpreter
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_fused_selection_matches_torch_path(case):
    b, hq, hkv, sq, sk, d, bs, probes, placement, params = CPU_CASES[case]
    _, _, sel, torch_sel = _check_case(
        b, hq, hkv, sq, sk, d, bs, probes, placement, params, "cpu", max_bad=0.0
    )
    assert torch.equal(sel.mask, torch_sel.mask)
    if params.get("threshold", 0.95) < 1.0 and sq > bs:
        assert sel.mask.float().mean() < 1.0  # a real selection, not everything


@needs_interpreter
@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,d,bs,probes,placement",
    [
        (1, 2, 1, 127, 127, 64, 32, 2, "ends"),
        (2, 4, 2, 300, 420, 32, 64, 3, "uniform"),
        (1, 6, 2, 1000, 1000, 16, 128, 1, "middle"),
        (1, 2, 2, 97, 97, 32, 16, 16, "ends"),  # every query of a block is a probe
        (2, 4, 2, 300, 420, 32, 64, 2, "shared"),  # prefix, ragged last block
        (1, 6, 2, 1000, 1000, 16, 128, 3, "shared"),
        (1, 2, 1, 65, 65, 32, 64, 3, "shared"),  # a 1-row last block: 2 probes there
    ],
)
def test_fused_block_probs_match_float64_reference(b, hq, hkv, sq, sk, d, bs, probes, placement):
    q, k = _qk(b, hq, hkv, sq, sk, d)
    rows, w = probe_layout(sq, bs, probes, placement)
    shared = shares_probes(placement, probes)
    got = probe_block_probs_fused(q, k, rows, w, bs, shared=shared).double()
    want = naive_probe_probs(q, k, bs, probes, placement)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-5, rtol=0)


@needs_interpreter
def test_log_masses_are_minus_inf_where_the_probe_sees_no_key():
    # a probe at the first row of a query block sees none of the diagonal block's later keys;
    # with placement "ends", probe 0 of block i sits at row i*BS: block i holds only its own key
    sq = sk = 256
    bs = 64
    q, k = _qk(1, 2, 1, sq, sk, 32)
    rows, _ = probe_layout(sq, bs, 2, "ends")
    lm = probe_block_log_masses(q, k, rows, bs)  # [B, Hq, NQB, P, NKB]
    assert torch.isfinite(lm[0, :, 3, 0, :4]).all()  # block 3, probe at row 192: blocks 0..3
    # exact value of the diagonal block for that probe: only key 192 itself
    s = (q[0, 0, 192] @ k[0, 0, 192]) / 32**0.5 / torch.log(torch.tensor(2.0))
    torch.testing.assert_close(lm[0, 0, 3, 0, 3], s, atol=1e-4, rtol=1e-5)


SCHEDULE_CASES = [  # (B, Hq, Hkv, Sq, Sk, D, BS, P, placement)
    (1, 2, 1, 127, 127, 64, 32, 2, "ends"),
    (2, 8, 2, 300, 300, 32, 64, 2, "ends"),
    (1, 4, 2, 290, 700, 64, 64, 3, "uniform"),  # cached prefix, not a block multiple
    (1, 6, 2, 1000, 1000, 64, 128, 2, "ends"),
    (1, 4, 2, 1, 500, 64, 64, 2, "ends"),  # one query row
    (1, 2, 1, 333, 333, 32, 48, 2, "ends"),  # BS not a power of two: padded KV blocks
]


def _visible_entries(lm, sq, sk, bs):
    """The entries of launch 1's output that launch 2 reads (KV blocks a query block sees)."""
    nqb, nkb = lm.shape[2], lm.shape[4]
    i = torch.arange(nqb, device=lm.device)
    last = (sk - sq) + torch.clamp((i + 1) * bs, max=sq) - 1
    vis = torch.arange(nkb, device=lm.device)[None, :] <= (last // bs)[:, None]
    return lm[vis[None, None, :, None, :].expand_as(lm)]


def _check_schedules_agree(q, k, rows, bs, atol):
    from prism.kernels.estimation.probe_kernels import launch_log_masses

    sq, sk = q.shape[2], k.shape[2]
    want = _visible_entries(launch_log_masses(q, k, rows, bs, schedule="q"), sq, sk, bs)
    for chunk in (1, 2):
        got = launch_log_masses(q, k, rows, bs, schedule="k", kv_chunk=chunk)
        got = _visible_entries(got, sq, sk, bs)
        fin = torch.isfinite(want)
        assert torch.equal(fin, torch.isfinite(got))  # the same -inf (probe sees no key)
        assert fin.any()
        torch.testing.assert_close(got[fin], want[fin], atol=atol, rtol=atol)


@needs_interpreter
@pytest.mark.parametrize("case", range(len(SCHEDULE_CASES)))
def test_kv_stationary_schedule_matches_query_schedule(case):
    b, hq, hkv, sq, sk, d, bs, probes, placement = SCHEDULE_CASES[case]
    q, k = _qk(b, hq, hkv, sq, sk, d)
    rows, _ = probe_layout(sq, bs, probes, placement)
    _check_schedules_agree(q, k, rows, bs, atol=1e-5)


def test_schedule_arguments_are_checked():
    from prism.kernels.estimation.probe_kernels import launch_log_masses

    q, k = _qk(1, 2, 1, 64, 64, 32)
    rows, _ = probe_layout(64, 32, 2, "ends")
    with pytest.raises(ValueError, match="valid"):
        launch_log_masses(q, k, rows, 32, schedule="x")
    with pytest.raises(ValueError, match="kv_chunk"):
        launch_log_masses(q, k, rows, 32, schedule="k", kv_chunk=3)
    with pytest.raises(ValueError, match="first_slot"):
        launch_log_masses(q, k, rows, 32, first_slot=2)
    with pytest.raises(ValueError, match="block_max"):
        launch_log_masses(q, k, rows, 32, reference="exact")
    with pytest.raises(ValueError, match="schedule='k'"):
        launch_log_masses(q, k, rows, 32, schedule="q", reference="fixed")


@needs_interpreter
def test_first_slot_reads_the_layout_in_place():
    """``first_slot=1`` (the shared layout) gives exactly launch 1 on a copy of slots 1.."""
    from prism.kernels.estimation.probe_kernels import launch_log_masses

    q, k = _qk(1, 4, 2, 300, 420, 32)
    rows, _ = probe_layout(300, 64, 3, "shared")
    for sched in ("q", "k"):
        got = launch_log_masses(q, k, rows, 64, schedule=sched, first_slot=1)
        want = launch_log_masses(q, k, rows[:, 1:].contiguous(), 64, schedule=sched)
        assert got.shape[3] == 2
        got, want = _visible_entries(got, 300, 420, 64), _visible_entries(want, 300, 420, 64)
        fin = torch.isfinite(want)
        assert torch.equal(fin, torch.isfinite(got)) and fin.any()
        assert torch.equal(got[fin], want[fin])


def _fixed_reference_floor(q, k, rows, bs):
    """float64 [B, Hq, NQB, P, 1]: ref - FLUSH_BITS of each probe row (ref = its own base-2
    score + REF_MARGIN), the level above which the fixed reference's entries are exact."""
    from prism.kernels.estimation.probe_kernels import FLUSH_BITS, REF_MARGIN

    b, hq, sq, d = q.shape
    g = hq // k.shape[1]
    r = rows.long().cpu()
    qd = q.double().cpu()[:, :, r]  # [B, Hq, NQB, P, D]
    kd = k.double().cpu().repeat_interleave(g, 1)[:, :, r + (k.shape[2] - sq)]
    own = (qd * kd).sum(-1) / math.sqrt(d) / math.log(2.0)
    return (own + REF_MARGIN - FLUSH_BITS)[..., None]


def _check_fixed_contract(got, exact, floor, atol):
    """The fixed reference's contract on launch 1's visible entries (float64 tensors of one
    shape): entries whose exact value is >= floor are finite and within ``atol`` (log2); the
    others may be low or -inf, and high only by the rounding of subnormal terms (each off by
    < 2^-149 of the reference = 2^(floor - 50); the GPU flushes them instead); nothing is NaN or
    +inf. Returns how many entries lie below the floor."""
    assert not torch.isnan(got).any() and not (got == float("inf")).any()
    hi = exact >= floor
    assert hi.any()
    assert torch.isfinite(got[hi]).all()
    err = (got[hi] - exact[hi]).abs().max().item()
    assert err <= atol, err
    lo = ~hi
    slack = floor[lo] - 50 + math.log2(128)  # a block of <= 128 keys: 128 rounded terms
    assert (got[lo] <= torch.logaddexp2(exact[lo], slack) + atol).all()
    return int(lo.sum())


def _fixed_vs_exact(q, k, rows, bs, first_slot, chunk=2, block_m=None, ref_atol=1e-3):
    """Launch 1 on the fixed reference and the float64 log-masses, as visible entries (got,
    exact, floor), and the launch's whole output. Checks the launch's own state on the way: its references are the probes'
    own base-2 scores + REF_MARGIN, and exactly the rows with a block sum past 2^128 of the
    reference are flagged for the repair (rounding aside: +-0.5 bit)."""
    from prism.kernels.estimation.probe_kernels import FLUSH_BITS, launch_log_masses

    sq, sk = q.shape[2], k.shape[2]
    got, ref, flags = launch_log_masses(q, k, rows, bs, first_slot=first_slot, kv_chunk=chunk,
                                        block_m=block_m, reference="fixed",
                                        return_state=True)  # fmt: skip
    r = rows[:, first_slot:]
    exact = naive_block_log_masses(q, k, r, bs).cpu()
    floor = _fixed_reference_floor(q, k, r, bs)
    want_ref = floor[..., 0] + FLUSH_BITS
    torch.testing.assert_close(ref.double().cpu(), want_ref, atol=ref_atol, rtol=1e-5)
    over = exact.amax(-1) - want_ref  # the largest block above the reference, bits
    flagged = flags.cpu() != 0
    assert flagged[over > 128.5].all() and not flagged[over < 127.5].any()
    floor = floor.expand_as(exact)
    vis = [_visible_entries(t, sq, sk, bs) for t in (got.double().cpu(), exact, floor)]
    return (*vis, got)


FIXED_CASES = [  # (B, Hq, Hkv, Sq, Sk, D, BS, P, placement, sharpen)
    (1, 2, 1, 127, 127, 64, 32, 2, "ends", 1.0),
    (2, 8, 2, 300, 300, 32, 64, 2, "ends", 1.0),
    (1, 4, 2, 290, 700, 64, 64, 3, "shared", 1.0),  # cached prefix, shared slots
    (1, 2, 1, 333, 333, 32, 48, 2, "ends", 1.0),  # padded KV blocks
    (1, 4, 2, 500, 500, 32, 32, 2, "ends", 6.0),  # peaked: many blocks below the floor
    (1, 4, 2, 290, 700, 64, 64, 2, "shared", 6.0),
]


def _score_atol(exact):
    """Tolerance (log2) of launch 1's entries against float64: 2e-4 plus the float32 rounding
    of the scores themselves, ~2^-20 of the largest base-2 score (the block-max path rounds the
    same: both are off by 2.6e-4 on the 6x-sharpened case, |score| ~1200 bits, under
    Triton 3.9's interpreter)."""
    return 2e-4 + 2.0**-20 * exact[torch.isfinite(exact)].abs().max().item()


@needs_interpreter
@pytest.mark.parametrize("case", range(len(FIXED_CASES)))
def test_fixed_reference_keeps_its_contract(case):
    """``reference="fixed"`` against the float64 log-masses: exact above ref - FLUSH_BITS, never
    above the exact value below it; the peaked cases do reach below the floor."""
    b, hq, hkv, sq, sk, d, bs, probes, placement, sharpen = FIXED_CASES[case]
    q, k = _qk(b, hq, hkv, sq, sk, d)
    q = q * sharpen
    rows, _ = probe_layout(sq, bs, probes, placement)
    for chunk in (1, 2):
        got, exact, floor, _ = _fixed_vs_exact(q, k, rows, bs, int(placement == "shared"), chunk)
        n_low = _check_fixed_contract(got, exact, floor, atol=_score_atol(exact))
        if sharpen > 1:
            assert n_low > 0


@needs_interpreter
@pytest.mark.parametrize("case", ["gqa_batch2_ragged300", "shared_gqa_batch2_prefix", "min_prob"])
def test_fixed_reference_selects_the_block_max_lists(case):
    """The selection with launch 1 on the fixed reference (``"auto"`` takes it from 512 KV blocks)
    equals the one on the block max."""
    b, hq, hkv, sq, sk, d, bs, probes, placement, params = CPU_CASES[case]
    q, k = _qk(b, hq, hkv, sq, sk, d)
    rows, w = probe_layout(sq, bs, probes, placement)
    kp = ProbeKernelParams(block_size=bs, **params)
    shared = shares_probes(placement, probes)
    want = probe_select_block_lists(q, k, rows, w, kp, shared, reference="block_max")
    got = probe_select_block_lists(q, k, rows, w, kp, shared, reference="fixed")
    for a, c in zip(want, got):
        assert torch.equal(a, c)
    assert 0 < (want[0] + want[2]).float().mean() < want[1].shape[-1]


def _overflow_inputs(device="cpu", dtype=torch.float32):
    """Block 6's probes (rows 192..223) score key 40 ~480 bits above their own score + margin
    (the fixed-reference block sums overflow: only the repair pass can give those rows) and the
    keys of block 2 ~520 bits below it (flushed against the reference, exact with the block
    max)."""
    q, k = _qk(1, 2, 1, 256, 256, 32, structured=False)
    k[:, :, 40] = 8.0
    k[:, :, 64:96] = -8.0
    q[:, :, 192:224] = 8.0
    return q.to(device, dtype), k.to(device, dtype)


def _check_overflow_repaired(device, dtype, atol):
    """Two query tiles (``block_m=16``: the repair walks unmasked and frontier blocks), both
    KV chunkings: block 6's rows are flagged (checked in :func:`_fixed_vs_exact`) and exact
    everywhere, below the floor too; the other rows keep the contract."""
    from prism.kernels.estimation.probe_kernels import FLUSH_BITS

    q, k = _overflow_inputs(device, dtype)
    rows, _ = probe_layout(256, 32, 2, "ends", q.device)
    exact = naive_block_log_masses(q, k, rows, 32).cpu()
    floor = _fixed_reference_floor(q, k, rows, 32)[..., 0]
    over = exact.amax(-1) - (floor + FLUSH_BITS) > 128 + 5  # block sums far past 2^128
    assert over[0, :, 6].all() and over.sum() == over[0, :, 6].numel()
    assert (exact[0, :, 6, :, 2] < floor[0, :, 6, :] - 300).all()  # block 2: far below
    for chunk in (1, 2):
        got, exact_v, floor_v, lm = _fixed_vs_exact(q, k, rows, 32, 0, chunk, block_m=16,
                                                    ref_atol=5e-2)  # fmt: skip
        _check_fixed_contract(got, exact_v, floor_v, atol=atol)
        lm = lm.double().cpu()[0, :, 6, :, :7]  # block 6 sees KV blocks 0..6
        assert torch.isfinite(exact[0, :, 6, :, :7]).all()
        torch.testing.assert_close(lm, exact[0, :, 6, :, :7], atol=atol, rtol=1e-6)


@needs_interpreter
def test_fixed_reference_repairs_overflowed_rows():
    _check_overflow_repaired("cpu", torch.float32, atol=2e-4)


def test_auto_reference_choice():
    """``reference="auto"``: the fixed reference only for top-p / min-prob (a floor >= 1e-12)
    from 512 KV blocks on."""
    from prism.kernels.estimation.probe_op import FIXED_MIN_BLOCKS, pick_reference

    assert FIXED_MIN_BLOCKS == 512
    kp = ProbeKernelParams
    assert pick_reference(kp(block_size=128), 512) == "fixed"
    assert pick_reference(kp(block_size=128), 511) == "block_max"
    assert pick_reference(kp(block_size=128, rule="top_k", top_k=8), 1024) == "block_max"
    assert pick_reference(kp(block_size=128, rule="min_prob", min_prob=0.01), 1024) == "fixed"
    assert pick_reference(kp(block_size=128, rule="min_prob", min_prob=1e-30), 1024) == (
        "block_max"
    )


def test_kernel_params_and_bad_input():
    with pytest.raises(ValueError, match="valid rules"):
        ProbeKernelParams(block_size=64, rule="nope")
    with pytest.raises(ValueError, match="valid"):
        ProbeScorer(impl="cuda")
    q = torch.randn(1, 3, 64, 32)
    k = torch.randn(1, 2, 64, 32)
    rows, w = probe_layout(64, 32, 2, "ends")
    with pytest.raises(ValueError, match="incompatible"):
        probe_select_block_lists(q, k, rows, w, ProbeKernelParams(block_size=32))
    with pytest.raises(TypeError, match="ProbeKernelParams"):
        probe_select_block_lists(q, k[:, :1], rows, w, {"block_size": 32})
    with pytest.raises(ValueError, match="Sq <= Sk"):
        probe_block_log_masses(q, k[:, :1, :10], rows, 32)
    with pytest.raises(ValueError, match="'auto', 'block_max', 'fixed'"):
        probe_select_block_lists(
            q, k[:, :1], rows, w, ProbeKernelParams(block_size=32), reference="exact"
        )


def test_auto_uses_torch_on_cpu():
    q, k = _qk(1, 2, 1, 200, 200, 32)
    sc = ProbeScorer(block_size=64)
    assert sc.resolve_impl(q, k) == "torch"
    sel = sc.select(q, k)
    assert sc.last_path == "torch"
    assert isinstance(sel, BlockSelection)


def test_layout_is_cached_per_device():
    a = probe_layout(1000, 128, 2, "ends")
    b = probe_layout(1000, 128, 2, "ends")
    assert a[0] is b[0] and a[1] is b[1]


# ------------------------------------------------------------------------------------------------
# GPU: compiled kernels, bf16, real lengths
# ------------------------------------------------------------------------------------------------
GPU_CASES = [  # (B, Hq, Hkv, Sq, Sk, D, BS, P, placement, params)
    (1, 32, 8, 8192, 8192, 128, 128, 2, "ends", {"dtype": torch.bfloat16}),
    (2, 9, 3, 5000, 5000, 64, 128, 2, "ends", {"dtype": torch.bfloat16, "threshold": 0.9}),
    (1, 8, 2, 3000, 8192, 128, 128, 2, "ends", {"dtype": torch.bfloat16}),  # prefix
    (1, 4, 2, 4097, 4097, 64, 64, 3, "uniform", {"dtype": torch.float16}),
    (1, 4, 1, 2000, 2000, 64, 128, 2, "ends", {"rule": "top_k", "top_k": 4}),  # fp32
    (1, 32, 8, 32768, 32768, 128, 128, 2, "ends", {"dtype": torch.bfloat16}),
    (1, 32, 8, 8192, 8192, 128, 128, 2, "shared", {"dtype": torch.bfloat16}),
    (1, 8, 2, 3000, 8192, 128, 128, 3, "shared", {"dtype": torch.bfloat16}),  # prefix
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_gpu_fused_matches_torch_path(case):
    b, hq, hkv, sq, sk, d, bs, probes, placement, params = GPU_CASES[case]
    q, k, sel, torch_sel = _check_case(
        b, hq, hkv, sq, sk, d, bs, probes, placement, params, "cuda", max_bad=0.002
    )
    # the mass estimate itself against the PyTorch path on the same inputs
    rows, w = probe_layout(sq, bs, probes, placement, q.device)
    got = probe_block_probs_fused(q, k, rows, w, bs, shared=shares_probes(placement, probes))
    want = probe_block_probs(q, k, bs, probes, placement)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-2)
    assert ProbeScorer(block_size=bs).resolve_impl(q, k) == "triton"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("sq,sk", [(8192, 8192), (5000, 5000), (3000, 8192), (32768, 32768)])
def test_gpu_kv_stationary_schedule_matches_query_schedule(sq, sk):
    q, k = _qk(1, 32, 8, sq, sk, 128, torch.bfloat16, "cuda")
    rows, _ = probe_layout(sq, 128, 2, "ends", q.device)
    _check_schedules_agree(q, k, rows, 128, atol=1e-3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "sq,sk,sharpen", [(8192, 8192, 1.0), (8192, 8192, 4.0), (3000, 8192, 1.0), (32768, 32768, 1.0)]
)
def test_gpu_fixed_reference_keeps_the_contract_and_the_lists(sq, sk, sharpen):
    """bf16, exp2 flushing subnormals: the contract against float64, and launch 2 selects the
    same top-p lists from the fixed reference's log-masses as from the block max's (rows whose
    boundary sits within rounding aside: at most 1 in 2,000)."""
    from prism.kernels.estimation.probe_kernels import launch_log_masses, launch_select

    q, k = _qk(1, 32, 8, sq, sk, 128, torch.bfloat16, "cuda")
    q = q * sharpen
    rows, w = probe_layout(sq, 128, 2, "shared", q.device)
    got, exact, floor, _ = _fixed_vs_exact(q, k, rows, 128, 1)
    _check_fixed_contract(got, exact, floor, atol=2e-3)
    params = ProbeKernelParams(block_size=128, threshold=0.95)
    lists = []
    for reference in ("fixed", "block_max"):
        lm = launch_log_masses(q, k, rows, 128, first_slot=1, reference=reference)
        lists.append(launch_select(lm, w, sq, sk, 8, params, shared=True))
    differ = (lists[0][0] != lists[1][0]) | (lists[0][2] != lists[1][2])
    assert differ.float().mean().item() <= 5e-4, int(differ.sum())


@pytest.mark.gpu
@needs_cuda
def test_gpu_fixed_reference_repairs_overflowed_rows():
    _check_overflow_repaired("cuda", torch.bfloat16, atol=2e-3)


def test_select_rows_per_program_must_be_a_power_of_two():
    from prism.kernels.estimation.probe_kernels import launch_select

    lm = torch.zeros(1, 3, 2, 2, 2)
    w = torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="power of two"):
        launch_select(lm, w, 64, 64, 1, ProbeKernelParams(block_size=32), rows_per_program=6)


def _search_cases():
    """(lm, weights, Sq, Sk, Hkv, params, shared): ragged, prefix, ties, top-k, top-p."""
    g = torch.Generator().manual_seed(7)
    out = []
    for (b, hq, hkv, sq, sk, bs, p, shared), rule in [
        ((1, 4, 2, 1000, 1000, 32, 2, False), dict(rule="top_p", threshold=0.9)),
        ((2, 3, 1, 777, 1200, 32, 1, True), dict(rule="top_p", threshold=0.97)),
        ((1, 2, 2, 1024, 1024, 16, 2, False), dict(rule="top_k", top_k=7)),
        ((1, 2, 1, 513, 513, 16, 1, True), dict(rule="top_k", top_k=1, force_sink=False)),
        ((1, 2, 1, 640, 640, 32, 2, False), dict(rule="top_p", threshold=0.5)),
    ]:
        nqb, nkb = -(-sq // bs), -(-sk // bs)
        lm = torch.randn(b, hq, nqb, p, nkb, generator=g) * 6
        if rule["rule"] == "top_k":  # ties: many equal log-masses
            lm = lm.round()
        w = torch.full((nqb, p + int(shared)), 1.0 / (p + int(shared)))
        out.append((lm, w, sq, sk, hkv, ProbeKernelParams(block_size=bs, **rule), shared))
    return out


@needs_interpreter
@pytest.mark.parametrize("case", range(5))
def test_quartering_search_keeps_the_bisection_set(case):
    """The three-threshold search (``search="quad"``) returns exactly the bisection's lists."""
    from prism.kernels.estimation.probe_kernels import launch_select

    lm, w, sq, sk, hkv, params, shared = _search_cases()[case]
    want = launch_select(lm, w, sq, sk, hkv, params, shared=shared, search="bisect")
    got = launch_select(lm, w, sq, sk, hkv, params, shared=shared, search="quad")
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert (want[0] + want[2]).float().mean() > 1.5  # a real selection, not all / nothing


def test_unknown_search_is_refused():
    from prism.kernels.estimation.probe_kernels import launch_select

    lm = torch.zeros(1, 3, 2, 2, 2)
    w = torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="bisect"):
        launch_select(lm, w, 64, 64, 1, ProbeKernelParams(block_size=32), search="ternary")
