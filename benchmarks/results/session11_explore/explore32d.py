import sys, time, math, torch
from prism.eval.recall import LayerData, evaluate_scorer, recall_at_density
from prism.scorers import build_scorer
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
L = int(sys.argv[1])
raw = torch.load(f"/tmp/cap/L{L}.pt")
layers = {}
for li, d in raw.items():
    ld = LayerData(d["q"], d["k"], d["bs"], d["chunk"]); ld._mass = d["mass"]; layers[li] = ld
TH = [0.1, 0.3, 0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98, 0.99, 0.995]
MP = [0.3, 0.1, 0.05, 0.03, 0.02, 0.015, 0.01, 0.007, 0.005, 0.003, 0.002, 0.0015, 0.001, 7e-4, 5e-4, 3e-4, 2e-4, 1e-4, 5e-5, 2e-5, 1e-5]
DENS = [0.10, 0.15, 0.20, 0.25, 0.30, 0.40]
res = {}
def sweep(name, probs, rule="top_p"):
    pts = []
    for v in (TH if rule == "top_p" else MP):
        kw = dict(threshold=v) if rule == "top_p" else dict(rule="min_prob", min_prob=v)
        r = evaluate_scorer(build_scorer("probe", impl="torch", **kw), layers, probs)
        pts.append((r["density"], r["recall"]))
    res[name] = [recall_at_density(pts, d) for d in DENS]
    ref = res.get("oracle top_p")
    s = " / ".join("  –   " if x is None else f"{x:.4f}" for x in res[name])
    if ref:
        g = [None if (a is None or b is None) else a - b for a, b in zip(res[name], ref)]
        s += "   gap " + " ".join("  –  " if x is None else f"{x:+.4f}" for x in g)
    print(f"{name:34s} {s}", flush=True)
norm = lambda p: p / p.sum(-1, keepdim=True).clamp_min(1e-30)
def rows_vs_pooled_keys(q, k, bs=128, stride=1):
    b, hq, sq, d = q.shape; hkv = k.shape[1]; g = hq // hkv
    nkb = -(-k.shape[2] // bs); nqb = -(-sq // bs)
    kb = torch.nn.functional.pad(k, (0, 0, 0, nkb * bs - k.shape[2])).view(b, hkv, nkb, bs, d).mean(3)
    kb = kb.repeat_interleave(g, 1)
    out = torch.zeros(b, hq, nqb, nkb)
    for i in range(nqb):
        qi = q[:, :, i*bs + stride // 2:(i+1)*bs:stride]
        lg = qi @ kb[:, :, : i + 1].transpose(-1, -2) / math.sqrt(d)
        out[:, :, i, : i + 1] = torch.softmax(lg, -1).mean(2)
    return out
t0 = time.time()
tp = {li: norm(ld.mass) for li, ld in layers.items()}
sweep("oracle top_p", tp)
P2 = build_scorer("probe", impl="torch", probes=2).block_probs
P3 = build_scorer("probe", impl="torch", probes=3).block_probs
pp2 = {li: P2(ld.q, ld.k) for li, ld in layers.items()}
pp3 = {li: P3(ld.q, ld.k) for li, ld in layers.items()}
def rk_rows(q, k, bs=128):
    # RK on the shared P=2 probe rows only: rows i*bs-1 and (i+1)*bs-1 (block 0: its last row)
    b, hq, sq, d = q.shape; hkv = k.shape[1]; g = hq // hkv
    nkb = -(-k.shape[2] // bs); nqb = -(-sq // bs)
    kb = torch.nn.functional.pad(k, (0, 0, 0, nkb * bs - k.shape[2])).view(b, hkv, nkb, bs, d).mean(3).repeat_interleave(g, 1)
    out = torch.zeros(b, hq, nqb, nkb)
    for i in range(nqb):
        rows = [min((i + 1) * bs, sq) - 1] + ([i * bs - 1] if i > 0 else [])
        qi = q[:, :, rows]
        lg = qi @ kb[:, :, : i + 1].transpose(-1, -2) / math.sqrt(d)
        if i > 0:
            lg[:, :, 1, i] = float("-inf")
        out[:, :, i, : i + 1] = torch.softmax(lg, -1).mean(2)
    return out
rk8 = {li: rows_vs_pooled_keys(ld.q, ld.k, stride=8) for li, ld in layers.items()}
rkp = {li: rk_rows(ld.q, ld.k) for li, ld in layers.items()}
for a in (0.2, 0.3):
    sweep(f"P=2 + {a} RK(probe rows)", {li: norm((1 - a) * pp2[li] + a * rkp[li]) for li in layers})
    sweep(f"P=2 * RK/8 ^ {a} geometric", {li: norm(pp2[li].clamp_min(1e-12) ** (1 - a) * rk8[li].clamp_min(1e-12) ** a * (pp2[li] > 0)) for li in layers})
sweep(f"P=3 + 0.3 RK(probe rows)", {li: norm(0.7 * pp3[li] + 0.3 * rkp[li]) for li in layers})
print("total", time.time() - t0, flush=True)
