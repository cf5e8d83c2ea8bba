"""The backend contract, checked for every registered backend (``prism.kernels.available_backends()``).

A backend is ``fn(q, k, v, block_mask, scale=None) -> out`` (q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D],
out [B, Hq, Sq, D] in q's dtype) over a FlexAttention ``BlockMask``. Checked against the oracle
(:func:`prism.kernels.reference.reference_attention` in float64) and plain SDPA:

* random block-causal selections on ragged lengths, GQA, batch 2 and a cached prefix (a multiple
  and a non-multiple of BS), in float32 / float64 (+ float16 for ``triton``);
* rows whose query block selects nothing give exactly 0; no NaN anywhere (a NaN-poisoned ``out``
  buffer where the backend takes one);
* the full block-causal selection equals ``scaled_dot_product_attention`` with the causal mask of
  the prefix;
* ``honours_mask_mod=True``: a custom ``mask_mod`` (a sliding window) is applied inside partial
  blocks; ``honours_mask_mod=False``: partial blocks get the causal rule (the docstring contract).

A backend that cannot run here skips with the reason (``flex_flash`` without CUDA + FA4, ``triton``
on CPU without Triton's interpreter, dtypes a backend does not support). A newly registered
backend runs every check; add its limits to ``_skip_reason`` if it has any.
"""

from __future__ import annotations

import inspect
import math
import zlib

import pytest
import torch

from prism.kernels import available_backends, get_backend
from prism.kernels.reference import reference_attention
from prism.masks.blockmask import selection_to_block_mask
from prism.testing import (
    block_mask_from_maps,
    causal_block_maps,
    dense_causal_attention,
    random_causal_block_maps,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name: (B, Hq, Hkv, Sq, Sk, D, BS, mask (Bm, Hm) or None for (B, Hq))
CASES = {
    "ragged127_bs64_gqa2": (1, 2, 1, 127, 127, 64, 64, None),
    "len1000_bs128_gqa2": (1, 2, 1, 1000, 1000, 64, 128, None),
    "prefix256_bs64_batch2_gqa2": (2, 4, 2, 128, 384, 64, 64, None),  # P = 256 = 4 BS
    "prefix300_bs64_batch2_bcast": (2, 2, 1, 200, 500, 32, 64, (1, 1)),  # P = 300, not k * BS
}
SMALL = ("ragged127_bs64_gqa2", "prefix300_bs64_batch2_bcast")
DTYPES = (torch.float32, torch.float64, torch.float16)
EXACT = (torch.float32, torch.float64)


def _scale(D: int) -> float:
    """A non-default softmax scale, the same in every test (flex compiles once per value)."""
    return 0.8 / math.sqrt(D)


def _skip_reason(name: str, dtype: torch.dtype | None = None) -> str | None:
    """Why backend ``name`` cannot run here (in ``dtype``), or None."""
    cuda = DEVICE == "cuda"
    if name == "flex_flash":
        from prism.kernels.flex import flash_available

        if not (cuda and flash_available()):
            return "flex_flash needs CUDA sm90+ and FlashAttention-4 (flash_attn.cute)"
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            return "FlexAttention's FLASH backend runs fp16 / bf16 only"
    if name == "triton":
        try:
            from prism.kernels.block_sparse import triton_fwd
        except Exception as e:  # Triton not installed / no usable backend
            return f"triton backend unavailable: {type(e).__name__}: {e}"
        if not cuda and not triton_fwd.interpreter_active():
            return "triton on CPU needs TRITON_INTERPRET=1 before Triton's first import"
        if dtype == torch.float64:
            return "the Triton kernel runs fp16 / bf16 / fp32"
    if name in ("flex", "flex_triton"):
        if dtype == torch.float64 and not cuda:
            return "FlexAttention on CPU runs fp32 / fp16 / bf16"
        if dtype == torch.float16 and not cuda:
            return (
                "fp16 flex on CPU: one more compile per shape; test_attention covers low precision"
            )
    if name == "reference" and dtype == torch.float16:
        return "the oracle computes in fp32 for fp16 inputs: nothing new to check"
    return None


def _backend(name: str, dtype: torch.dtype | None = None):
    why = _skip_reason(name, dtype)
    if why:
        pytest.skip(why)
    return get_backend(name)


def _tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 2e-5}.get(dtype, 2e-3)


def _inputs(case: str, dtype: torch.dtype):
    B, Hq, Hkv, Sq, Sk, D, BS, _ = CASES[case]
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q, k, v = (torch.randn(B, h, s, D, generator=g) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


def _random_maps(case: str, density: float = 0.5, empty_rows: bool = False):
    """(partial, full) bool [Bm, Hm, NQB, NKB]: diagonal partial blocks + random full blocks;
    with ``empty_rows`` query block 1 of every head (and a random share of others) selects none."""
    B, Hq, _, Sq, Sk, _, BS, mbh = CASES[case]
    Bm, Hm = mbh or (B, Hq)
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()) + 1)
    part, full = random_causal_block_maps(Bm, Hm, Sq, Sk, BS, density, g)
    if empty_rows:
        drop = torch.rand(part.shape[:3] + (1,), generator=g) < 0.3
        drop[:, :, 1] = True
        part, full = part & ~drop, full & ~drop
    return part.to(DEVICE), full.to(DEVICE)


def _oracle(q, k, v, bm, scale=None):
    return reference_attention(
        q, k, v, bm, scale, compute_dtype=torch.float64, out_dtype=torch.float64
    )


def _call(backend, q, k, v, bm, scale):
    """Run the backend; a NaN-poisoned ``out`` buffer where its function takes one."""
    if "out" in inspect.signature(backend.fn).parameters:
        out = torch.full_like(q, float("nan"))
        res = backend.fn(q, k, v, bm, scale=scale, out=out)
        res = out if res is None else res
    else:
        res = backend(q, k, v, bm, scale=scale)
    assert res.shape == q.shape and res.dtype == q.dtype and res.device == q.device
    assert not torch.isnan(res).any(), "NaN in the output"
    return res


def _params(dtypes=DTYPES, cases=tuple(CASES)):
    return [
        pytest.param(b, c, dt, id=f"{b}-{c}-{str(dt).split('.')[-1]}")
        for b in available_backends()
        for c in cases
        for dt in dtypes
    ]


@pytest.mark.parametrize("name,case,dtype", _params())
def test_matches_oracle(name, case, dtype):
    backend = _backend(name, dtype)
    q, k, v = _inputs(case, dtype)
    *_, Sq, Sk, D, BS, _ = CASES[case]
    part, full = _random_maps(case)
    bm = block_mask_from_maps(part, full, Sq, Sk, BS)
    out = _call(backend, q, k, v, bm, _scale(D))
    ref = _oracle(q, k, v, bm, _scale(D))
    torch.testing.assert_close(out.double(), ref, rtol=_tol(dtype), atol=_tol(dtype))


@pytest.mark.parametrize(
    "name,case,dtype",
    _params((torch.float32,), ("ragged127_bs64_gqa2", "prefix300_bs64_batch2_bcast")),
)
def test_empty_rows_are_zero(name, case, dtype):
    backend = _backend(name, dtype)
    q, k, v = _inputs(case, dtype)
    *_, Sq, Sk, D, BS, _ = CASES[case]
    part, full = _random_maps(case, empty_rows=True)
    bm = block_mask_from_maps(part, full, Sq, Sk, BS)
    out = _call(backend, q, k, v, bm, _scale(D))
    ref = _oracle(q, k, v, bm, _scale(D))
    rows = ~(part | full).any(-1)  # [Bm, Hm, NQB]: query blocks that select nothing
    rows = rows.expand(q.shape[0], q.shape[1], -1).repeat_interleave(BS, -1)[..., :Sq]
    assert rows.any()
    assert (out[rows] == 0).all()
    assert (out[~rows] != 0).any()
    torch.testing.assert_close(out.double(), ref, rtol=_tol(dtype), atol=_tol(dtype))


@pytest.mark.parametrize("name,case,dtype", _params(EXACT))
def test_full_selection_equals_causal_sdpa(name, case, dtype):
    backend = _backend(name, dtype)
    q, k, v = _inputs(case, dtype)
    B, Hq, _, Sq, Sk, D, BS, mbh = CASES[case]
    visible, _ = causal_block_maps(Sq, Sk, BS, device=DEVICE)
    bm = selection_to_block_mask(visible.expand(*(mbh or (B, Hq)), *visible.shape), Sq, Sk, BS)
    out = _call(backend, q, k, v, bm, _scale(D))
    want = dense_causal_attention(q.double(), k.double(), v.double(), scale=_scale(D))
    torch.testing.assert_close(out.double(), want, rtol=_tol(dtype), atol=_tol(dtype))


WINDOW = 40  # tokens: cuts through the 64-token blocks


def _window_mask_mod(prefix: int, window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        dist = q_idx + prefix - kv_idx
        return (dist >= 0) & (dist < window)

    return mask_mod


@pytest.mark.parametrize(
    "name,case,dtype",
    _params((torch.float32,), ("ragged127_bs64_gqa2", "prefix300_bs64_batch2_bcast")),
)
def test_mask_mod_in_partial_blocks(name, case, dtype):
    """Every selected block is a partial block carrying a sliding-window ``mask_mod``: a backend
    that honours ``mask_mod`` applies the window, one that does not applies the causal rule."""
    backend = _backend(name, dtype)
    q, k, v = _inputs(case, dtype)
    B, Hq, _, Sq, Sk, D, BS, _ = CASES[case]
    part, full = _random_maps(case, density=0.7)
    sel = part | full
    bm = block_mask_from_maps(
        sel, None, Sq, Sk, BS, with_full_lists=False, mask_mod=_window_mask_mod(Sk - Sq, WINDOW)
    )
    out = _call(backend, q, k, v, bm, _scale(D))

    # the windowed answer, written out token by token in float64
    qb, kb = torch.arange(Sq, device=DEVICE) // BS, torch.arange(Sk, device=DEVICE) // BS
    blocks = sel.expand(B, Hq, *sel.shape[2:])[:, :, qb][..., kb]
    dist = torch.arange(Sq, device=DEVICE)[:, None] + (Sk - Sq) - torch.arange(Sk, device=DEVICE)
    allowed = blocks & (dist >= 0) & (dist < WINDOW)
    g = Hq // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * _scale(D)
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    windowed = torch.einsum("bhqk,bhkd->bhqd", p, v.double().repeat_interleave(g, 1))
    causal = _oracle(q, k, v, bm, _scale(D))
    assert (windowed - causal).abs().max() > 0.1  # the two contracts differ on this mask

    want = windowed if backend.honours_mask_mod else causal
    torch.testing.assert_close(out.double(), want, rtol=_tol(dtype), atol=_tol(dtype))


def test_every_backend_is_a_record():
    for name in available_backends():
        b = get_backend(name)
        assert b.name == name and callable(b.fn) and isinstance(b.honours_mask_mod, bool)
    assert get_backend("reference").honours_mask_mod is False
    assert get_backend("triton").honours_mask_mod is False
    assert get_backend("flex").honours_mask_mod is True
