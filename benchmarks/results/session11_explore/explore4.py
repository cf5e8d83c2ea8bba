"""Explore probe-estimator variants on cached layers (q, k, mass)."""
import sys, time, torch
from prism.eval.recall import LayerData, evaluate_scorer, recall_at_density
from prism.scorers import build_scorer
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
L = int(sys.argv[1])
raw = torch.load(f"/tmp/cap/L{L}.pt")
layers = {}
for li, d in raw.items():
    ld = LayerData(d["q"], d["k"], d["bs"], d["chunk"]); ld._mass = d["mass"]; layers[li] = ld
TH = [0.1, 0.3, 0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98, 0.99, 0.995]
DENS = [0.10, 0.15, 0.20, 0.25, 0.30, 0.40]
res = {}
def sweep(name, probs):
    pts = []
    for th in TH:
        r = evaluate_scorer(build_scorer("probe", threshold=th, impl="torch"), layers, probs)
        pts.append((r["density"], r["recall"]))
    res[name] = [recall_at_density(pts, d) for d in DENS]
    ref = res.get("oracle")
    s = " / ".join("  –   " if x is None else f"{x:.4f}" for x in res[name])
    if ref and name != "oracle":
        g = [None if (a is None or b is None) else a - b for a, b in zip(res[name], ref)]
        s += "   gap " + " ".join("  –  " if x is None else f"{x:+.4f}" for x in g)
    print(f"{name:28s} {s}", flush=True)
def norm(p):
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)
t0 = time.time()
sweep("oracle", {li: norm(ld.mass) for li, ld in layers.items()})
def bp(**kw):
    sc = build_scorer("probe", impl="torch", **kw)
    return {li: sc.block_probs(ld.q, ld.k) for li, ld in layers.items()}
last = bp(probes=1, placement="last")      # row i*BS+BS-1 (per block)
sh2 = bp(probes=2, placement="shared")
sweep("shared P=2", sh2)
def vis_mask(nqb, nkb, dev):
    i = torch.arange(nqb)[:, None]; j = torch.arange(nkb)[None]
    return (j <= i + (nkb - nqb))
def shift(x, k):
    # y[..., i, :] = x[..., i+k, :] (zero where out of range)
    y = torch.zeros_like(x)
    n = x.shape[-2]
    if k >= 0: y[..., : n - k, :] = x[..., k:, :]
    else: y[..., -k:, :] = x[..., : n + k, :]
    return y
def smoothed(weights):
    out = {}
    for li in layers:
        x = last[li]
        acc = torch.zeros_like(x)
        for k, w in weights.items():
            acc += w * shift(x, k)
        v = vis_mask(x.shape[-2], x.shape[-1], x.device)
        acc = acc * v
        out[li] = norm(acc)
    return out
# sanity: shared P=2 == (last_{i-1}+last_i)/2 except block 0
chk = smoothed({-1: 0.5, 0: 0.5})
print("max|sh2-chk| rows>=1:", max(float((sh2[li][..., 1:, :] - chk[li][..., 1:, :]).abs().max()) for li in layers))
import math
def rows_vs_pooled_keys(q, k, bs=128):
    b, hq, sq, d = q.shape; hkv = k.shape[1]; g = hq // hkv
    nkb = -(-k.shape[2] // bs); nqb = -(-sq // bs)
    kb = torch.nn.functional.pad(k, (0, 0, 0, nkb * bs - k.shape[2])).view(b, hkv, nkb, bs, d).mean(3)
    kb = kb.repeat_interleave(g, 1)
    out = torch.zeros(b, hq, nqb, nkb)
    for i in range(nqb):
        qi = q[:, :, i*bs:(i+1)*bs]
        lg = qi @ kb[:, :, : i + 1].transpose(-1, -2) / math.sqrt(d)
        out[:, :, i, : i + 1] = torch.softmax(lg, -1).mean(2)
    return out
def pooled_query_vs_keys(q, k, bs=128):
    b, hq, sq, d = q.shape; hkv = k.shape[1]; g = hq // hkv
    nkb = -(-k.shape[2] // bs); nqb = -(-sq // bs)
    kk = k.repeat_interleave(g, 1)
    out = torch.zeros(b, hq, nqb, nkb)
    for i in range(nqb):
        qb = q[:, :, i*bs:(i+1)*bs].mean(2, keepdim=True)
        n = min((i + 1) * bs, k.shape[2])
        p = torch.softmax(qb @ kk[:, :, :n].transpose(-1, -2) / math.sqrt(d), -1)[:, :, 0]
        p = torch.nn.functional.pad(p, (0, (i + 1) * bs - n)).view(b, hq, i + 1, bs).sum(-1)
        out[:, :, i, : i + 1] = p
    return out
for name, fn in (("rows-vs-pooled-keys", rows_vs_pooled_keys), ("pooled-q-vs-keys", pooled_query_vs_keys)):
    op = {li: fn(ld.q, ld.k) for li, ld in layers.items()}
    sweep(name, op)
    for a in (0.15, 0.3):
        sweep(f"shared2 + {a} {name}", {li: norm((1 - a) * sh2[li] + a * op[li]) for li in layers})
print("total", time.time() - t0)
