"""Plain float64 loop references for the baseline scorers (xattn, flexprefill, minference).

Written from the definitions in the scorers' docstrings (DESIGN.md §5), without any of prism's
helpers: one (batch, head) at a time, Python loops and lists for every selection, a token-level
mask for the vertical-slash block mapping. Descending orders break ties by position (Python's sort
is stable: lower index first), the documented rule of ``prism.masks.select``.
"""

from __future__ import annotations

import math

import torch


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _softmax(values: list[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) for v in values]
    s = sum(e)
    return [x / s for x in e]


def _last_query(i: int, sq: int, sk: int, bs: int) -> int:
    """Absolute position of the last query of query block i."""
    return (sk - sq) + min((i + 1) * bs, sq) - 1


def _visible_blocks(i: int, sq: int, sk: int, bs: int) -> list[int]:
    last = _last_query(i, sq, sk, bs)
    return [j for j in range(_ceil_div(sk, bs)) if j * bs <= last]


def _forced_blocks(i, sq, sk, bs, force_sink, force_diagonal) -> list[int]:
    out = []
    for j in _visible_blocks(i, sq, sk, bs):
        partial = j * bs + bs - 1 > (sk - sq) + i * bs
        if (force_sink and j == 0) or (force_diagonal and partial):
            out.append(j)
    return out


def _add_forced(mask, sq, sk, bs, force_sink, force_diagonal):
    for i in range(mask.shape[2]):
        for j in _forced_blocks(i, sq, sk, bs, force_sink, force_diagonal):
            mask[:, :, i, j] = True
    return mask


def _keep_until(values: list[float], p: float, start: float = 0.0) -> list[int]:
    """Indices of the minimal descending prefix: keep an entry while (start + mass before) < p·total,
    total = start + sum(values); p >= 1 keeps all."""
    if p >= 1.0:
        return list(range(len(values)))
    total = start + sum(values)
    order = sorted(range(len(values)), key=lambda t: -values[t])
    kept, before = [], start
    for t in order:
        if before < p * total:
            kept.append(t)
        before += values[t]
    return kept


def _top(values: list[float], count: int) -> list[int]:
    order = sorted(range(len(values)), key=lambda t: -values[t])
    return order[:count]


def _pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    n = _ceil_div(x.shape[0], multiple) * multiple
    out = torch.zeros(n, x.shape[1], dtype=torch.float64)
    out[: x.shape[0]] = x
    return out


# ------------------------------------------------------------------------------------------------
# XAttention
# ------------------------------------------------------------------------------------------------
def naive_xattn(q, k, bs=128, stride=8, tau=0.9, force_sink=True, force_diagonal=True):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    p = sk - sq
    S = stride
    nqg, nkg = _ceil_div(sq, S), _ceil_div(sk, S)
    nqb, nkb = _ceil_div(sq, bs), _ceil_div(sk, bs)
    mask = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    for bb in range(b):
        for h in range(hq):
            Q = _pad_rows(q[bb, h].double(), S)
            K = _pad_rows(k[bb, h // g].double(), S)
            # antidiagonal of every S x S tile: sum over t of q[iS + S-1-t] . k[jS + t]
            x = torch.zeros(nqg, nkg, dtype=torch.float64)
            for t in range(S):
                x += Q[S - 1 - t :: S] @ K[t::S].T
            x /= math.sqrt(d) * S
            A = [[0.0] * nkb for _ in range(nqb)]  # block sums of the row probabilities
            rows_in_block = [0] * nqb
            for i in range(nqg):
                last = p + min((i + 1) * S, sq) - 1
                cols = [j for j in range(nkg) if j * S <= last]  # a prefix of the key groups
                probs = _softmax(x[i, : len(cols)].tolist())
                row = A[i * S // bs]
                for j, pr in zip(cols, probs):
                    row[j * S // bs] += pr
                rows_in_block[i * S // bs] += 1
            for i in range(nqb):
                A[i] = [a / rows_in_block[i] for a in A[i]]
                vis = _visible_blocks(i, sq, sk, bs)
                forced = _forced_blocks(i, sq, sk, bs, force_sink, force_diagonal)
                others = [j for j in vis if j not in forced]
                start = sum(A[i][j] for j in forced)
                for j in forced:
                    mask[bb, h, i, j] = True
                for t in _keep_until([A[i][j] for j in others], tau, start):
                    mask[bb, h, i, others[t]] = True
    return mask


# ------------------------------------------------------------------------------------------------
# the probe shared by FlexPrefill and MInference
# ------------------------------------------------------------------------------------------------
def _probe(qh: torch.Tensor, kh: torch.Tensor, n: int):
    """Last n queries of one head vs all keys, causal softmax (float64). Returns the probability
    matrix [n, Sk], column sums [Sk] and diagonal sums [Sk] (index = offset a - c)."""
    sq, d = qh.shape
    sk = kh.shape[0]
    K, Q = kh.double(), qh.double()
    P = torch.zeros(n, sk, dtype=torch.float64)
    for r in range(n):
        a = sk - n + r  # absolute position of probe row r
        z = (K[: a + 1] @ Q[sq - n + r]) / math.sqrt(d)
        P[r, : a + 1] = torch.softmax(z, dim=0)
    cols = P.sum(0)
    diags = torch.zeros(sk, dtype=torch.float64)
    for r in range(n):
        a = sk - n + r
        for_offsets = P[r, : a + 1].flip(0)  # entry o is key a - o
        diags[: a + 1] += for_offsets
    return P, cols, diags


def _token_geometry(sq: int, sk: int):
    """(allowed [Sq, Sk]: key c <= absolute query position P + t, offset [Sq, Sk]: P + t - c)."""
    a = (sk - sq) + torch.arange(sq)[:, None]
    c = torch.arange(sk)[None, :]
    return c <= a, (a - c).clamp(min=0)


def _touched_blocks(col_sel: list[bool], diag_sel: list[bool], geometry, sq: int, sk: int, bs: int):
    """Token-level: (query t, key c) is covered iff c <= P + t and (column c or offset P + t - c is
    selected); a block is kept iff it holds a covered pair."""
    allowed, off = geometry
    nqb, nkb = _ceil_div(sq, bs), _ceil_div(sk, bs)
    covered = allowed & (torch.tensor(col_sel)[None, :] | torch.tensor(diag_sel)[off])
    full = torch.zeros(nqb * bs, nkb * bs, dtype=torch.bool)
    full[:sq, :sk] = covered
    return full.view(nqb, bs, nkb, bs).any(3).any(1)


# ------------------------------------------------------------------------------------------------
# MInference
# ------------------------------------------------------------------------------------------------
def naive_minference(
    q,
    k,
    bs=128,
    vertical=512,
    slash=2048,
    forced_vertical=30,
    forced_slash=100,
    probe=64,
    force_sink=True,
    force_diagonal=True,
):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    n = min(probe, sq)
    nqb, nkb = _ceil_div(sq, bs), _ceil_div(sk, bs)
    mask = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    geometry = _token_geometry(sq, sk)
    for bb in range(b):
        for h in range(hq):
            _, cols, diags = _probe(q[bb, h], k[bb, h // g], n)
            col_sel = [False] * sk
            for c in range(min(forced_vertical, sk)):
                col_sel[c] = True
            rest = [c for c in range(sk) if not col_sel[c]]
            for t in _top([float(cols[c]) for c in rest], min(vertical, sk) - sum(col_sel)):
                col_sel[rest[t]] = True
            diag_sel = [False] * sk
            for o in range(min(forced_slash, sk)):
                diag_sel[o] = True
            rest = [o for o in range(sk) if not diag_sel[o]]
            for t in _top([float(diags[o]) for o in rest], min(slash, sk) - sum(diag_sel)):
                diag_sel[rest[t]] = True
            mask[bb, h] = _touched_blocks(col_sel, diag_sel, geometry, sq, sk, bs)
    return _add_forced(mask, sq, sk, bs, force_sink, force_diagonal)


# ------------------------------------------------------------------------------------------------
# FlexPrefill
# ------------------------------------------------------------------------------------------------
def _jsd_sqrt(p: list[float], q: list[float]) -> float:
    total = 0.0
    for x, y in zip(p, q):
        m = (x + y) / 2
        if x > 0:
            total += 0.5 * x * math.log(x / m)
        if y > 0:
            total += 0.5 * y * math.log(y / m)
    return math.sqrt(max(total, 0.0))


def _block_means(x: torch.Tensor, bs: int) -> torch.Tensor:
    return _pad_rows(x.double(), bs).view(-1, bs, x.shape[1]).mean(1)


def naive_flexprefill(
    q, k, bs=128, gamma=0.95, tau=0.1, min_budget=1024, force_sink=True, force_diagonal=True
):
    """Returns (mask bool [B, Hq, NQB, NKB], sqrt-JSD float64 [B, Hq], query-aware bool [B, Hq])."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    n = min(bs, sq)
    nqb, nkb = _ceil_div(sq, bs), _ceil_div(sk, bs)
    mask = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    dists = torch.zeros(b, hq, dtype=torch.float64)
    aware = torch.zeros(b, hq, dtype=torch.bool)
    geometry = _token_geometry(sq, sk)
    for bb in range(b):
        for h in range(hq):
            qh, kh = q[bb, h].double(), k[bb, h // g].double()
            _, cols, diags = _probe(qh, kh, n)
            kbar = _block_means(kh, bs)
            qmean = qh[sq - n :].mean(0)
            est = _softmax([float(kbar[j] @ qmean) / math.sqrt(d) for j in range(nkb)])
            prof = [float(cols[j * bs : (j + 1) * bs].sum()) / n for j in range(nkb)]
            dist = _jsd_sqrt(est, prof)
            dists[bb, h] = dist
            if gamma >= 1.0:
                for i in range(nqb):
                    for j in _visible_blocks(i, sq, sk, bs):
                        mask[bb, h, i, j] = True
            elif dist < tau:
                aware[bb, h] = True
                qbar = _block_means(qh, bs)
                entries, values = [], []
                row_top = []
                for i in range(nqb):
                    vis = _visible_blocks(i, sq, sk, bs)
                    pr = _softmax([float(qbar[i] @ kbar[j]) / math.sqrt(d) for j in vis])
                    for j, x in zip(vis, pr):
                        entries.append((i, j))
                        values.append(x / nqb)
                    per_row = _ceil_div(min_budget, bs)
                    row_top += [(i, vis[t]) for t in _top(pr, min(per_row, len(vis)))]
                for t in _keep_until(values, gamma):
                    i, j = entries[t]
                    mask[bb, h, i, j] = True
                for i, j in row_top:
                    mask[bb, h, i, j] = True
            else:
                cvals = [float(x) for x in cols]
                dvals = [float(x) for x in diags]
                col_sel = [False] * sk
                diag_sel = [False] * sk
                for c in _keep_until(cvals, gamma) + _top(cvals, min(min_budget, sk)):
                    col_sel[c] = True
                for o in _keep_until(dvals, gamma) + _top(dvals, min(min_budget, sk)):
                    diag_sel[o] = True
                mask[bb, h] = _touched_blocks(col_sel, diag_sel, geometry, sq, sk, bs)
    return _add_forced(mask, sq, sk, bs, force_sink, force_diagonal), dists, aware
