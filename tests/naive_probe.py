"""Plain float64 loop reference for the probe scorer (issue 11), written without prism's helpers.

Loops over batch, query head, query block and probe; each probe's causal softmax is computed on
its own row, its probabilities are added key by key into their blocks."""

from __future__ import annotations

import math

import torch


def naive_probe_rows(length: int, probes: int, placement: str, has_prev: bool = True) -> list[int]:
    """Offsets of the probes inside a query block of ``length`` real rows (float arithmetic).
    ``shared``: evenly spaced from -1 (the previous block's last row; dropped without one) to
    ``length - 1``."""
    if placement == "shared":
        if probes == 1:
            return [length - 1]
        n = min(probes, length + 1)
        offs = [int(math.floor(t * length / (n - 1) + 0.5)) - 1 for t in range(n)]
        return offs if has_prev else offs[1:]
    n = min(probes, length)
    if placement == "ends":
        if n == 1:
            return [length - 1]
        return [int(math.floor(t * (length - 1) / (n - 1) + 0.5)) for t in range(n)]
    if placement == "middle":
        first = (length - n) // 2
        return [first + t for t in range(n)]
    if placement == "uniform":
        return [int(math.floor((t + 0.5) * length / n)) for t in range(n)]
    if placement == "last":
        return [length - n + t for t in range(n)]
    raise ValueError(placement)


def naive_probe_probs(q, k, bs=128, probes=2, placement="ends") -> torch.Tensor:
    """float64 [B, Hq, NQB, NKB] probe estimate of the block mass (rows sum to 1)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    prefix = sk - sq
    nqb, nkb = math.ceil(sq / bs), math.ceil(sk / bs)
    qd, kd = q.double(), k.double()
    out = torch.zeros(b, hq, nqb, nkb, dtype=torch.float64)
    for bb in range(b):
        for h in range(hq):
            keys = kd[bb, h // g]
            for i in range(nqb):
                length = min(bs, sq - i * bs)
                offs = naive_probe_rows(length, probes, placement, has_prev=i > 0)
                acc = [0.0] * nkb
                for r in offs:
                    t = i * bs + r
                    a = prefix + t  # absolute position: sees keys 0 .. a
                    z = (keys[: a + 1] @ qd[bb, h, t]) / math.sqrt(d)
                    e = torch.exp(z - z.max())
                    p = e / e.sum()
                    for j in range(nkb):
                        acc[j] += float(p[j * bs : (j + 1) * bs].sum())  # empty past a: 0
                for j in range(nkb):
                    out[bb, h, i, j] = acc[j] / len(offs)
    return out


def naive_block_log_masses(q, k, rows, bs=128):
    """float64 [B, Hq, NQB, P, NKB]: entry (b, h, i, p, j) is log2 of the unnormalised probe
    mass ``Σ_{c in block j, c <= a} exp(q_a·k_c / sqrt(D))`` of the probe at query row
    ``rows[i][p]`` (absolute position a = Sk - Sq + row); ``-inf`` where it sees no key of j.
    Per (batch, head): every probe against every key in float64, causal keys kept, keys padded
    to whole blocks, one logsumexp per block (on q's device)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    nqb, p = rows.shape
    nkb = math.ceil(sk / bs)
    r = rows.to(q.device).long().reshape(-1)  # [NQB * P]
    apos = (sk - sq) + r
    keys_pos = torch.arange(nkb * bs, device=q.device)
    seen = keys_pos[None, :] <= apos[:, None]  # [NQB * P, NKB * BS] (padding never seen)
    out = torch.empty(b, hq, nqb, p, nkb, dtype=torch.float64, device=q.device)
    for bb in range(b):
        for h in range(hq):
            kd = torch.zeros(nkb * bs, d, dtype=torch.float64, device=q.device)
            kd[:sk] = k[bb, h // g].double()
            z = (q[bb, h].double()[r] @ kd.T) / math.sqrt(d)  # [NQB * P, NKB * BS]
            z = z.masked_fill(~seen, float("-inf")).reshape(-1, nkb, bs)
            out[bb, h] = (torch.logsumexp(z, -1) / math.log(2.0)).reshape(nqb, p, nkb)
    return out


def _visible_row(i, sq, sk, bs):
    last = (sk - sq) + min((i + 1) * bs, sq) - 1
    return [j for j in range(math.ceil(sk / bs)) if j * bs <= last]


def naive_probe(
    q,
    k,
    bs=128,
    probes=2,
    placement="ends",
    p=0.95,
    force_sink=True,
    force_diagonal=True,
    probs=None,
) -> torch.Tensor:
    """bool [B, Hq, NQB, NKB]: top-p on the probe estimate (or on ``probs``, float [B, Hq, NQB,
    NKB], when given) plus the forced blocks."""
    if probs is None:
        probs = naive_probe_probs(q, k, bs, probes, placement)
    b, hq, nqb, nkb = probs.shape
    sq, sk = q.shape[2], k.shape[2]
    mask = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    for bb in range(b):
        for h in range(hq):
            for i in range(nqb):
                vis = _visible_row(i, sq, sk, bs)
                order = sorted(vis, key=lambda j: -float(probs[bb, h, i, j]))
                before = 0.0
                for j in order:
                    if p >= 1.0 or before < p:
                        mask[bb, h, i, j] = True
                    before += float(probs[bb, h, i, j])
                for j in vis:
                    partial = j * bs + bs - 1 > (sk - sq) + i * bs
                    if (force_sink and j == 0) or (force_diagonal and partial):
                        mask[bb, h, i, j] = True
    return mask


def naive_pooled_key_probs(q, k, bs=128, stride=8) -> torch.Tensor:
    """float64 [B, Hq, NQB, NKB]: the pooled-key estimate of the probe scorer's ``pooled_mix``.

    Query block i (L rows) uses rows ``o = stride//2, stride//2 + stride, ... < L`` (its last row
    when there is none). Row t (absolute position a = Sk - Sq + i·bs + t) scores each key block j
    with ``j·bs <= a`` by ``q_t · mean(k of block j) / sqrt(D) + log(n_j)`` (n_j the block's real
    keys, the whole block even where it passes a), takes the softmax over those blocks; the
    block's rows are averaged."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    prefix = sk - sq
    nqb, nkb = math.ceil(sq / bs), math.ceil(sk / bs)
    out = torch.zeros(b, hq, nqb, nkb, dtype=torch.float64)
    for bb in range(b):
        for h in range(hq):
            keys = k[bb, h // g].double()
            means = [keys[j * bs : min((j + 1) * bs, sk)].mean(0) for j in range(nkb)]
            counts = [min((j + 1) * bs, sk) - j * bs for j in range(nkb)]
            for i in range(nqb):
                length = min(bs, sq - i * bs)
                offs = list(range(stride // 2, length, stride)) or [length - 1]
                for o in offs:
                    a = prefix + i * bs + o
                    vis = [j for j in range(nkb) if j * bs <= a]
                    qv = q[bb, h, i * bs + o].double()
                    z = torch.stack(
                        [qv @ means[j] / math.sqrt(d) + math.log(counts[j]) for j in vis]
                    )
                    pr = torch.softmax(z, 0)
                    for n, j in enumerate(vis):
                        out[bb, h, i, j] += float(pr[n]) / len(offs)
    return out
