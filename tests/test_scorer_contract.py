"""The contract every registered scorer must meet (DESIGN.md §3), parametrised over
``prism.available_scorers()``: a scorer added later gets these checks without editing this file.

* ``threshold=1.0`` selects every causal block (``== block_causal(...)[0]``), forcing on or off;
* with the default knobs the sink and every partial (diagonal) block are selected;
* the selection is block-causal (nothing outside ``visible``) and its density is in (0, 1];
* the mask is per query head, bool ``[B, Hq, NQB, NKB]``; GQA (Hq=4, Hkv=2) gives the same
  selection as repeating K per query head (query head h uses KV head h // G);
* every batch row is scored on its own (batch 2 == each row alone);
* cached prefixes (Sk > Sq, lengths multiples of the block and not) and ragged lengths.

Float32 on CPU, small shapes, block size 16 / 32. ``EXTRA_KWARGS`` holds the minimal constructor
arguments of scorers that need some (a combinator needs children); anything else is built with
``block_size`` only.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import prism
from prism.masks import block_causal
from prism.scorers import SCORERS
from prism.synthetic import synthetic_qkv

# minimal extra constructor arguments per scorer (on top of block_size)
_CHILDREN = [{"scorer": "meanpool", "threshold": 0.5}, {"scorer": "window", "window": 1}]
EXTRA_KWARGS: dict[str, dict] = {
    "union": {"policies": _CHILDREN},
    "intersection": {"policies": _CHILDREN},
}

# scorer-specific impossibilities: {name: reason}. Keep empty unless a check cannot apply.
SKIP: dict[str, str] = {}

# scorers whose CPU path is a Triton kernel under the interpreter (TRITON_INTERPRET=1, set by
# conftest.py without CUDA): 2-15 s a call, so they run one case only (ragged + cached prefix);
# tests/test_prism_fused.py checks that kernel against the PyTorch path in depth
INTERPRETED = {"prism_fused"}
INTERPRETED_CASE = (50, 133, 16)

CASES = [  # (Sq, Sk, BS)
    (127, 127, 16),  # ragged: one short last block
    (1000, 1000, 32),  # ragged, longer
    (64, 160, 16),  # cached prefix, Sq and Sk multiples of BS
    (50, 133, 16),  # cached prefix, neither a multiple of BS
    (96, 250, 32),  # cached prefix, Sq a multiple of BS, Sk not
]
CASE_IDS = [f"sq{sq}-sk{sk}-bs{bs}" for sq, sk, bs in CASES]
# the batch / GQA check runs each scorer three more times: the short cases suffice (and keep the
# Triton-interpreter scorers fast when TRITON_INTERPRET=1)
SHORT = [c for c in CASES if c[1] <= 250]
SHORT_IDS = [f"sq{sq}-sk{sk}-bs{bs}" for sq, sk, bs in SHORT]
B, HQ, HKV, D = 2, 4, 2, 32

SCORER_NAMES = prism.available_scorers()


def kwargs_for(name: str, block_size: int, **over) -> dict:
    params = dict(EXTRA_KWARGS.get(name, {}))
    if name not in EXTRA_KWARGS and "policies" in {
        f.name for f in dataclasses.fields(SCORERS[name].Config)
    }:
        params["policies"] = _CHILDREN  # a combinator added later: the default children
    return {**params, "block_size": block_size, **over}


def build(name: str, block_size: int, case: tuple[int, int, int] | None = None, **over):
    if name in SKIP:
        pytest.skip(SKIP[name])
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
    if name in INTERPRETED and interpreted and case not in (None, INTERPRETED_CASE):
        pytest.skip(f"{name} runs under Triton's interpreter here: only {INTERPRETED_CASE}")
    return prism.build_scorer(name, **kwargs_for(name, block_size, **over))


_INPUTS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def inputs(sq: int, sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-like RoPE'd q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (float32; cached per shape)."""
    if (sq, sk) not in _INPUTS:
        q, k, _ = synthetic_qkv(
            batch=B, q_heads=HQ, kv_heads=HKV, length=sk, q_len=sq, head_dim=D, seed=sq + sk
        )
        _INPUTS[(sq, sk)] = (q, k)
    return _INPUTS[(sq, sk)]


def test_registry_is_covered():
    """Every scorer named in the tables is registered (no stale entries)."""
    assert set(EXTRA_KWARGS) <= set(SCORER_NAMES)
    assert set(SKIP) <= set(SCORER_NAMES)
    assert {"prism", "meanpool", "xattn", "flexprefill", "minference"} <= set(SCORER_NAMES)


@pytest.mark.parametrize("sq,sk,bs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", SCORER_NAMES)
def test_selection_contract(name, sq, sk, bs):
    q, k = inputs(sq, sk)
    scorer = build(name, bs, (sq, sk, bs))
    sel = scorer(q, k)
    visible, partial = block_causal(sq, sk, bs)
    nqb, nkb = visible.shape
    mask = sel.mask
    # per query head, the declared geometry
    assert mask.dtype == torch.bool
    assert mask.shape == (B, HQ, nqb, nkb)
    assert (sel.q_len, sel.kv_len, sel.block_size) == (sq, sk, bs)
    # block-causal
    assert not (mask & ~visible).any(), "selected a block outside the causal pattern"
    # forced blocks with the default knobs
    assert scorer.config.force_sink and scorer.config.force_diagonal
    assert mask[..., 0].all(), "sink block not selected"
    assert (mask | ~partial).all(), "a partial (diagonal) block is missing"
    # density
    dens = sel.density
    assert 0.0 < dens <= 1.0
    expect = (mask & visible).sum(dim=(-2, -1)).float() / visible.sum()
    torch.testing.assert_close(sel.density_per_head(), expect)


@pytest.mark.parametrize("sq,sk,bs", SHORT, ids=SHORT_IDS)
@pytest.mark.parametrize("name", SCORER_NAMES)
def test_batch_rows_are_independent_and_gqa_is_per_query_head(name, sq, sk, bs):
    q, k = inputs(sq, sk)
    scorer = build(name, bs, (sq, sk, bs))
    mask = scorer(q, k).mask
    for row in range(B):
        alone = scorer(q[row : row + 1], k[row : row + 1]).mask
        assert torch.equal(alone, mask[row : row + 1]), f"batch row {row} depends on the others"
    # GQA: query head h uses KV head h // G, i.e. the same as K repeated per query head
    k_rep = k.repeat_interleave(HQ // HKV, dim=1)
    assert torch.equal(scorer(q, k_rep).mask, mask), "GQA head mapping differs from repeated K"


@pytest.mark.parametrize("forcing", [True, False], ids=["forced", "unforced"])
@pytest.mark.parametrize("sq,sk,bs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", SCORER_NAMES)
def test_threshold_one_selects_every_causal_block(name, sq, sk, bs, forcing):
    q, k = inputs(sq, sk)
    scorer = build(
        name, bs, (sq, sk, bs), threshold=1.0, force_sink=forcing, force_diagonal=forcing
    )
    sel = scorer(q, k)
    visible, _ = block_causal(sq, sk, bs)
    assert torch.equal(sel.mask, visible.expand(B, HQ, *visible.shape))
    assert sel.density == 1.0


@pytest.mark.parametrize("name", SCORER_NAMES)
def test_single_query_block_and_single_head(name):
    """The smallest inputs: one query (decode-like, long prefix) and one head."""
    q, k = inputs(1, 77)
    q, k = q[:, :1], k[:, :1]
    sel = build(name, 16)(q, k)
    visible, partial = block_causal(1, 77, 16)
    assert sel.mask.shape == (B, 1, 1, visible.shape[1])
    assert not (sel.mask & ~visible).any()
    assert sel.mask[..., 0].all() and (sel.mask | ~partial).all()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", SCORER_NAMES)
def test_config_is_read_only_once_built(name):
    """A built scorer's config cannot be changed under it (its kernel parameters and the key of
    its compiled op were read from it); ``dataclasses.replace`` gives a new, editable one."""
    scorer = build(name, 16)
    with pytest.raises(AttributeError, match="read-only"):
        scorer.config.threshold = 0.5
    assert scorer.config.threshold != 0.5
    other = dataclasses.replace(scorer.config, threshold=0.5)
    other.block_size = 32  # not yet built into a scorer: editable
    rebuilt = type(scorer)(other)
    assert rebuilt.config.threshold == 0.5 and rebuilt.config.block_size == 32
