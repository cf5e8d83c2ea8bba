"""Vertical-slash pieces shared by the MInference and FlexPrefill scorers.

* :func:`probe_profiles` — the probe: the last ``n`` queries' causal softmax against all keys,
  reduced to its column sums (vertical profile) and diagonal sums (slash profile);
* :func:`top_lines` — the highest columns / diagonals with a forced leading range;
* :func:`lines_to_blocks` — the blocks that selected columns and diagonals touch.

The probe is chunked over keys (``chunk_size`` keys at a time, two passes: log-sum-exp, then the
sums), so memory is ``O(B · Hq · n · chunk_size)``, vectorised over batch and heads; GQA views the
query heads as ``[B, Hkv, G·n, D]`` so K is never repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masks.select import top_k


def probe_profiles(
    q: torch.Tensor, k: torch.Tensor, n: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal sums of the last ``n`` queries' causal softmax.

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D]. The probe rows are the last n queries, at absolute
    positions ``a_r = Sk − n + r``; row r sees keys ``c <= a_r``; scale 1/sqrt(D); float32 softmax.
    Returns ``vertical`` and ``slash``, both float32 [B, Hq, Sk]: ``vertical[c] = Σ_r p[r, c]`` and
    ``slash[o] = Σ_r p[r, a_r − o]`` (o = 0 the main diagonal); each sums to n per (b, h).
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    dev = q.device
    qp = q[:, :, sq - n :].reshape(b, hkv, g * n, d)
    scale = d**-0.5
    pos = torch.arange(sk - n, sk, device=dev)  # absolute position of each probe row
    bounds = [(c0, min(c0 + chunk_size, sk)) for c0 in range(0, sk, chunk_size)]

    def logits(c0: int, c1: int) -> torch.Tensor:
        s = torch.matmul(qp, k[:, :, c0:c1].transpose(-1, -2)).view(b, hq, n, c1 - c0)
        s = s.float().mul_(scale)
        if c1 - 1 > sk - n:  # the chunk holds keys some probe rows may not see
            cols = torch.arange(c0, c1, device=dev)
            s.masked_fill_(cols[None, :] > pos[:, None], float("-inf"))
        return s

    lse = None
    if len(bounds) > 1:
        lse = torch.full((b, hq, n), float("-inf"), device=dev)
        for c0, c1 in bounds:
            lse = torch.logaddexp(lse, torch.logsumexp(logits(c0, c1), dim=-1))

    vertical = torch.zeros(b, hq, sk, dtype=torch.float32, device=dev)
    slash_rev = torch.zeros(b, hq, sk + n - 1, dtype=torch.float32, device=dev)
    for c0, c1 in bounds:
        s = logits(c0, c1)
        p = s.softmax(dim=-1) if lse is None else s.sub_(lse[..., None]).exp_()
        w = c1 - c0
        vertical[..., c0:c1] = p.sum(dim=-2)
        # diagonal sums: shear row r left by r (zero margins of n − 1 on both sides) so that
        # every diagonal becomes a column; column u then holds offset o = Sk − 1 − (c0 + u)
        y = F.pad(p, (n - 1, n - 1))
        width = w + 2 * (n - 1)
        sheared = y.as_strided((b, hq, n, w + n - 1), (hq * n * width, n * width, width + 1, 1))
        slash_rev[..., c0 : c0 + w + n - 1] += sheared.sum(dim=-2)
        del s, p, y, sheared
    return vertical, slash_rev[..., :sk].flip(-1)


def _range_count(csum: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Number of selected entries in ``[lo, hi]`` from ``csum`` (int [B, H, L + 1], a leading 0).
    lo, hi int [NQB, NKB] (clamped here; empty when hi < lo) -> int [B, H, NQB, NKB]."""
    length = csum.shape[-1] - 1
    lo_c = lo.clamp(0, length).flatten()
    hi_c = (hi + 1).clamp(0, length).flatten()
    cnt = csum.index_select(-1, hi_c) - csum.index_select(-1, lo_c)
    return cnt.view(*csum.shape[:2], *lo.shape) * (hi >= lo)


def lines_to_blocks(
    columns: torch.Tensor | None, offsets: torch.Tensor | None, sq: int, sk: int, block_size: int
) -> torch.Tensor:
    """Blocks touched by selected columns and diagonals: bool [B, H, NQB, NKB].

    columns / offsets: bool [B, H, Sk] (selected key positions / diagonal offsets o = a − c), or
    None. Block (i, j) is touched iff some query a of block i (absolute ``P + i·BS … P +
    min((i+1)·BS, Sq) − 1``) and key c of block j with ``c <= a`` has ``columns[c]`` or
    ``offsets[a − c]``. Computed from prefix counts, never at token level.
    """
    dev = (columns if columns is not None else offsets).device
    bs = block_size
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    prefix = sk - sq
    i = torch.arange(nqb, device=dev)[:, None]
    j = torch.arange(nkb, device=dev)[None, :]
    lo_q = prefix + i * bs  # first query of the row (absolute)
    hi_q = prefix + torch.clamp((i + 1) * bs, max=sq) - 1  # last query of the row
    k0 = j * bs
    k1 = k0 + bs - 1
    visible = k0 <= hi_q
    keep = None
    if columns is not None:
        csum = F.pad(columns.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
        keep = _range_count(csum, k0.expand(nqb, nkb), torch.minimum(k1, hi_q)) > 0
    if offsets is not None:
        csum = F.pad(offsets.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
        touched = _range_count(csum, (lo_q - k1).clamp_min(0), hi_q - k0) > 0
        keep = touched if keep is None else keep | touched
    return keep & visible


def top_lines(score: torch.Tensor, count: int, forced: int) -> torch.Tensor:
    """bool [..., L]: the ``count`` highest entries of ``score`` float [..., L] (the
    :func:`~prism.masks.select.top_k` rule), the first ``forced`` always among them
    (``forced <= count``; both clipped to L)."""
    forced = min(forced, score.shape[-1])
    if forced:
        score = score.clone()
        score[..., :forced] = float("inf")
    return top_k(score, None, count)
