"""Plain, loop-based float64 references for the Prism and mean-pool scorers (DESIGN.md §4).

Deliberately written without any of prism's helpers. Ties in a descending order are broken by
position (Python's sort is stable: lower KV block index first), the documented rule of
``prism.masks.select``. ``bs`` is the block size, or the pair ``(BSQ, BSK)`` of a rectangular
grid (query blocks of BSQ rows, KV blocks of BSK columns)."""

from __future__ import annotations

import math

import torch


def _qk(bs) -> tuple[int, int]:
    return (bs[0], bs[1]) if isinstance(bs, (tuple, list)) else (bs, bs)


def _pool(x: torch.Tensor, bs: int) -> torch.Tensor:
    b, h, s, d = x.shape
    n = math.ceil(s / bs)
    padded = torch.zeros(b, h, n * bs, d, dtype=torch.float64)
    padded[:, :, :s] = x.double()
    return padded.view(b, h, n, bs, d).mean(3)


def _band(d: int, width: int, which: str, layout: str) -> list[int]:
    half = d // 2
    pairs = list(range(width // 2)) if which == "high" else list(range(half - width // 2, half))
    if layout == "half":
        return pairs + [j + half for j in pairs]
    out = []
    for j in pairs:
        out += [2 * j, 2 * j + 1]
    return out


def _rms(x: torch.Tensor) -> float:
    return max(math.sqrt(float((x * x).mean())), 1e-6)


def _visible(i: int, sq: int, sk: int, bs) -> list[int]:
    bq, bk = _qk(bs)
    p = sk - sq
    last = p + min((i + 1) * bq, sq) - 1
    return [j for j in range(math.ceil(sk / bk)) if j * bk <= last]


def _is_partial(i: int, j: int, sq: int, sk: int, bs) -> bool:
    bq, bk = _qk(bs)
    return j * bk + bk - 1 > (sk - sq) + i * bq


def _top_p_row(logits: list[float], p: float) -> list[int]:
    """Indices (into logits) of the minimal descending prefix whose mass reaches p."""
    m = max(logits)
    e = [math.exp(z - m) for z in logits]
    tot = sum(e)
    probs = [x / tot for x in e]
    if p >= 1.0:
        return list(range(len(probs)))
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    keep, before = [], 0.0
    for t in order:
        if before < p:
            keep.append(t)
        before += probs[t]
    return keep


def _finish(mask, sq, sk, bs, force_sink, force_diag):
    b, h, nqb, nkb = mask.shape
    for i in range(nqb):
        for j in _visible(i, sq, sk, bs):
            if (force_sink and j == 0) or (force_diag and _is_partial(i, j, sq, sk, bs)):
                mask[:, :, i, j] = True
    return mask


def naive_meanpool(q, k, bs=128, p=0.95, force_sink=True, force_diagonal=True):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    qp, kp = _pool(q, _qk(bs)[0]), _pool(k, _qk(bs)[1])
    nqb, nkb = qp.shape[2], kp.shape[2]
    mask = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    for bb in range(b):
        for h in range(hq):
            for i in range(nqb):
                vis = _visible(i, sq, sk, bs)
                z = [float(qp[bb, h, i] @ kp[bb, h // g, j]) / math.sqrt(d) for j in vis]
                for t in _top_p_row(z, p):
                    mask[bb, h, i, vis[t]] = True
    return _finish(mask, sq, sk, bs, force_sink, force_diagonal)


def naive_oracle(q, k, bs=128, p=0.95, force_sink=True, force_diagonal=True):
    """float64 loops: each query's causal softmax added key by key into its block row, then
    top-p over the block row's masses (and the forced blocks)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    nqb, nkb = math.ceil(sq / bs), math.ceil(sk / bs)
    qd, kd = q.double(), k.double()
    mask = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    for bb in range(b):
        for h in range(hq):
            for i in range(nqb):
                acc = [0.0] * nkb
                for t in range(i * bs, min((i + 1) * bs, sq)):
                    a = (sk - sq) + t
                    z = (kd[bb, h // g, : a + 1] @ qd[bb, h, t]) / math.sqrt(d)
                    e = torch.exp(z - z.max())
                    e = e / e.sum()
                    for c in range(a + 1):
                        acc[c // bs] += float(e[c])
                vis = _visible(i, sq, sk, bs)
                logits = [math.log(max(acc[j], 1e-300)) for j in vis]
                for t in _top_p_row(logits, p):
                    mask[bb, h, i, vis[t]] = True
    return _finish(mask, sq, sk, bs, force_sink, force_diagonal)


def naive_prism(
    q,
    k,
    bs=128,
    p_high=0.95,
    p_low=0.95,
    high_dims=None,
    low_dims=None,
    calibrate=True,
    layout="half",
    force_sink=True,
    force_diagonal=True,
):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    high_dims = d // 2 if high_dims is None else high_dims
    low_dims = 3 * d // 4 if low_dims is None else low_dims
    qp, kp = _pool(q, _qk(bs)[0]), _pool(k, _qk(bs)[1])
    nqb, nkb = qp.shape[2], kp.shape[2]
    mask = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    bands = [("high", high_dims, p_high), ("low", low_dims, p_low)]
    for bb in range(b):
        for h in range(hq):
            kh = h // g
            for which, width, p in bands:
                dims = _band(d, width, which, layout)
                qb, kb = qp[bb, h][:, dims], kp[bb, kh][:, dims]
                tau = 1.0
                if calibrate:
                    tau = (
                        math.sqrt(width / d)
                        * (_rms(qb) / _rms(qp[bb, h]))
                        * (_rms(kb) / _rms(kp[bb, kh]))
                    )
                for i in range(nqb):
                    vis = _visible(i, sq, sk, bs)
                    z = [float(qb[i] @ kb[j]) / (math.sqrt(width) * tau) for j in vis]
                    for t in _top_p_row(z, p):
                        mask[bb, h, i, vis[t]] = True
    return _finish(mask, sq, sk, bs, force_sink, force_diagonal)


def naive_visible(sq, sk, bs):
    nqb, nkb = math.ceil(sq / _qk(bs)[0]), math.ceil(sk / _qk(bs)[1])
    vis = torch.zeros(nqb, nkb, dtype=torch.bool)
    part = torch.zeros(nqb, nkb, dtype=torch.bool)
    for i in range(nqb):
        for j in _visible(i, sq, sk, bs):
            vis[i, j] = True
            part[i, j] = _is_partial(i, j, sq, sk, bs)
    return vis, part
