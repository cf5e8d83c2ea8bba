"""Block-sparse attention over explicit token positions, returning the log-sum-exp.

Context parallelism runs attention on pieces that are not a contiguous causal square: a rank's
queries are two zig-zag chunks, its keys are a shard of another rank or a set of fetched blocks.
So the op here takes the *absolute position* of every query and key instead of assuming
``arange``; the causal rule is ``kv_pos <= q_pos`` token by token, and a block pair is computed
only where the block selection says so. Partial outputs of several such calls over disjoint key
sets merge exactly with :func:`merge_partials` (log-sum-exp).

Two implementations, the same semantics:

* ``"torch"``: block-gathered float32 math (each query block gathers only its selected KV blocks,
  so the work is proportional to the selected blocks); the CPU path and the test oracle's twin;
* ``"flex"``: compiled torch FlexAttention with ``return_lse`` over a ``BlockMask`` built from the
  block lists (``BlockMask.from_kv_blocks``), with a ``mask_mod`` reading the two position
  tables; selected blocks entirely below the causal frontier are passed as *full* blocks.

``"auto"`` picks ``flex`` on CUDA, ``torch`` elsewhere.
"""

from __future__ import annotations

import math

import torch

from ..masks import bool_to_block_lists

__all__ = ["block_attention_lse", "merge_partials", "INVALID_POS"]

#: position given to padding keys: no query ever sees it
INVALID_POS = 1 << 62

#: scores held per step of the torch path (elements)
_STEP_ELEMENTS = 1 << 24


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Merge two attention partials over disjoint key sets.

    out_* float32 [B, Hq, Sq, Dv], lse_* float32 [B, Hq, Sq] (natural log; ``-inf`` where a
    part saw no key). Returns the (out, lse) of attention over the union of the key sets.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(lse_a - ref).unsqueeze(-1)
    wb = torch.exp(lse_b - ref).unsqueeze(-1)
    return out_a * wa + out_b * wb, lse


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[2] == length:
        return x
    pad = x.new_zeros(*x.shape[:2], length - x.shape[2], *x.shape[3:])
    return torch.cat([x, pad], dim=2)


def _pad_pos(pos: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    if pos.numel() == length:
        return pos
    return torch.cat([pos, pos.new_full((length - pos.numel(),), fill)])


def block_attention_lse(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_pos: torch.Tensor,
    sel: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal block-sparse attention with explicit positions.

    Args:
        q: [B, Hq, Sq, D]; q_pos: int64 [Sq], absolute position of every query.
        k, v: [B, Hkv, Sk, D] / [B, Hkv, Sk, Dv]; kv_pos: int64 [Sk] (:data:`INVALID_POS` for a
            padding key). GQA: query head ``h`` reads KV head ``h // G``.
        sel: bool [B, Hq, NQB, NKB] over the blocks of *these* tensors (query block ``i`` = rows
            ``i*BS ..``, KV block ``j`` = keys ``j*BS ..``); broadcast dims of size 1 are allowed.
        block_size: BS.  scale: default ``D ** -0.5``.
        impl: ``"torch"``, ``"flex"`` or ``"auto"``.

    Query ``t`` sees key ``s`` iff ``sel`` holds their block pair and ``kv_pos[s] <= q_pos[t]``.
    Returns ``(out float32 [B, Hq, Sq, Dv], lse float32 [B, Hq, Sq])``; a query that sees no key
    gets ``out = 0`` and ``lse = -inf``.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"GQA needs Hq % Hkv == 0, got Hq={hq}, Hkv={hkv}")
    bs = int(block_size)
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    if sel.dim() != 4 or tuple(sel.shape[-2:]) != (nqb, nkb):
        raise ValueError(f"sel must be bool [B, Hq, {nqb}, {nkb}], got {tuple(sel.shape)}")
    if q_pos.numel() != sq or kv_pos.numel() != sk:
        raise ValueError("q_pos / kv_pos must give one position per query / key")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    sel = sel.to(q.device).expand(b, hq, nqb, nkb)
    if impl == "auto":
        impl = "flex" if q.is_cuda else "torch"
    if impl == "torch":
        return _torch_impl(q, q_pos, k, v, kv_pos, sel, bs, scale)
    if impl == "flex":
        return _flex_impl(q, q_pos, k, v, kv_pos, sel, bs, scale)
    raise ValueError(f"unknown impl {impl!r}; valid: ['auto', 'torch', 'flex']")


def _torch_impl(q, q_pos, k, v, kv_pos, sel, bs, scale):
    b, hq, sq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    nqb, nkb = sel.shape[-2:]
    dev = q.device
    f32 = torch.float32
    out = torch.zeros(b, hq, nqb * bs, dv, dtype=f32, device=dev)
    lse = torch.full((b, hq, nqb * bs), float("-inf"), dtype=f32, device=dev)
    num, idx = bool_to_block_lists(sel)  # [B, Hq, NQB], [B, Hq, NQB, NKB]
    width = int(num.max()) if num.numel() else 0
    if width == 0:
        return out[:, :, :sq], lse[:, :, :sq]
    idx = idx[..., :width].long()
    valid = torch.arange(width, device=dev) < num.unsqueeze(-1)  # [B, Hq, NQB, W]

    qp = _pad_seq(q, nqb * bs).to(f32).reshape(b, hq, nqb, bs, d)
    qpos = _pad_pos(q_pos.to(dev), nqb * bs, -1).view(nqb, bs)  # -1: padding sees nothing
    # K / V as rows of blocks, plus one zero block (row ``zero``) that every unused list entry
    # points at: blocks outside the selection are never read (NaN there cannot leak in)
    zero = b * hkv * nkb
    kb = torch.cat(
        [_pad_seq(k, nkb * bs).to(f32).reshape(zero, bs, d), k.new_zeros(1, bs, d, dtype=f32)]
    )
    vb = torch.cat(
        [_pad_seq(v, nkb * bs).to(f32).reshape(zero, bs, dv), v.new_zeros(1, bs, dv, dtype=f32)]
    )
    kpos = torch.cat(
        [
            _pad_pos(kv_pos.to(dev), nkb * bs, INVALID_POS).view(nkb, bs),
            kv_pos.new_full((1, bs), INVALID_POS, device=dev),
        ]
    )
    # flat row of (batch, KV head of query head h, block) in kb / vb; unused entries -> zero
    head = torch.arange(b, device=dev)[:, None] * hkv + torch.arange(hq, device=dev)[None] // g
    rows_all = torch.where(valid, head[:, :, None, None] * nkb + idx, zero)
    blk_all = torch.where(valid, idx, nkb)  # block id for the position table

    step = max(1, _STEP_ELEMENTS // max(1, b * hq * bs * width * bs))
    for i0 in range(0, nqb, step):
        i1 = min(i0 + step, nqb)
        rows = rows_all[:, :, i0:i1].reshape(-1)
        kg = kb.index_select(0, rows).view(b, hq, i1 - i0, width * bs, d)
        vg = vb.index_select(0, rows).view(b, hq, i1 - i0, width * bs, dv)
        kp = kpos[blk_all[:, :, i0:i1]]  # [B, Hq, n, W, BS]
        # the zero block's keys sit at INVALID_POS: never allowed
        allowed = kp[:, :, :, None] <= qpos[i0:i1][None, None, :, :, None, None]
        # [B, Hq, n, BSq, W, BS]
        allowed = allowed.flatten(-2)
        s = torch.einsum("bhnid,bhnjd->bhnij", qp[:, :, i0:i1], kg) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [B, Hq, n, BSq]
        ref = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        p = torch.exp(s - ref.unsqueeze(-1))
        o = torch.einsum("bhnij,bhnjd->bhnid", p, vg)
        out[:, :, i0 * bs : i1 * bs] = o.flatten(2, 3)
        lse[:, :, i0 * bs : i1 * bs] = row_lse.flatten(2, 3)
    return out[:, :, :sq], lse[:, :, :sq]


def _flex_call(q, k, v, kv_num, kv_idx, full_num, full_idx, qpos, kpos, bs, scale, gqa, opts):
    """The compiled region: the BlockMask is built here, from the block lists and the two
    position tables (captured tensors indexed by ``q_idx`` / ``kv_idx``, which FlexAttention's
    Triton and FLASH backends both accept), so no Python closure changes between calls."""
    from torch.nn.attention.flex_attention import flex_attention

    from ..masks.blockmask import block_mask_from_lists

    def mask_mod(bi, hi, qi, ki):
        return kpos[ki] <= qpos[qi]

    bm = block_mask_from_lists(
        kv_num, kv_idx, full_num, full_idx, mask_mod, q.shape[2], k.shape[2], bs
    )
    kwargs = dict(block_mask=bm, scale=scale, enable_gqa=gqa, kernel_options=opts)
    if _AuxRequest is not None:
        out, aux = flex_attention(q, k, v, return_aux=_AuxRequest(lse=True), **kwargs)
        return out, aux.lse
    return flex_attention(q, k, v, return_lse=True, **kwargs)


try:  # torch >= 2.9
    from torch.nn.attention.flex_attention import AuxRequest as _AuxRequest
except ImportError:  # pragma: no cover - older torch: return_lse
    _AuxRequest = None


def _flex_impl(q, q_pos, k, v, kv_pos, sel, bs, scale):
    from ..kernels.flex import _compile_limits, _compiled

    sq = q.shape[2]
    nqb, nkb = sel.shape[-2:]
    dev = q.device
    sq_p, sk_p = nqb * bs, nkb * bs
    qpos = _pad_pos(q_pos.to(dev), sq_p, -1).to(torch.int64)
    kpos = _pad_pos(kv_pos.to(dev), sk_p, INVALID_POS).to(torch.int64)
    qq, kk, vv = _pad_seq(q, sq_p), _pad_seq(k, sk_p), _pad_seq(v, sk_p)
    # a selected block is full when its last key is at or before its first query
    qv = qpos.view(nqb, bs)
    q_min = qv.masked_fill(qv < 0, INVALID_POS).amin(-1)
    k_max = kpos.view(nkb, bs).amax(-1)
    full = sel & (k_max[None, :] <= q_min[:, None])
    part = sel & ~full
    kv_num, kv_idx = bool_to_block_lists(part)
    full_num, full_idx = bool_to_block_lists(full)
    opts = {"BLOCK_M": bs, "BLOCK_N": bs} if (q.is_cuda and bs < 128) else None
    gqa = q.shape[1] != k.shape[1]
    with _compile_limits():
        out, lse = _compiled(_flex_call)(
            qq, kk, vv, kv_num, kv_idx, full_num, full_idx, qpos, kpos, bs, scale, gqa, opts
        )
    out, lse = out[:, :, :sq].float(), lse[:, :, :sq].float()
    # rows that see no key: FlexAttention documents out = 0, lse = -inf; enforce it so that a
    # merge never reads anything else
    out = out.masked_fill(~torch.isfinite(lse).unsqueeze(-1), 0.0)
    return out, lse
