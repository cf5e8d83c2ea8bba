import sys, time, math, torch
from prism.eval.recall import LayerData, evaluate_scorer, recall_at_density
from prism.scorers import build_scorer
torch.set_num_threads(1)
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
    for v in TH:
        r = evaluate_scorer(build_scorer("probe", impl="torch", threshold=v), layers, probs)
        pts.append((r["density"], r["recall"]))
    res[name] = [recall_at_density(pts, d) for d in DENS]
    ref = res.get("oracle")
    s = " / ".join("  –   " if x is None else f"{x:.4f}" for x in res[name])
    if ref:
        g = [None if (a is None or b is None) else a - b for a, b in zip(res[name], ref)]
        s += "   gap " + " ".join("  –  " if x is None else f"{x:+.4f}" for x in g)
    print(f"{name:34s} {s}", flush=True)
norm = lambda p: p / p.sum(-1, keepdim=True)
def subpool(q, k, m, stride=8, bs=128):
    b, hq, sq, d = q.shape; hkv = k.shape[1]; g = hq // hkv
    nkb = k.shape[2] // bs; nqb = sq // bs; ns = bs // m
    km = k.view(b, hkv, nkb * ns, m, d).mean(3).repeat_interleave(g, 1)
    out = torch.zeros(b, hq, nqb, nkb)
    for i in range(nqb):
        qi = q[:, :, i*bs + stride // 2:(i+1)*bs:stride]
        lg = qi @ km[:, :, : (i + 1) * ns].transpose(-1, -2) / math.sqrt(d)
        p = torch.softmax(lg, -1).mean(2)
        out[:, :, i, : i + 1] = p.view(b, hq, i + 1, ns).sum(-1)
    return out
sweep("oracle", {li: norm(ld.mass) for li, ld in layers.items()})
pp2 = {li: build_scorer("probe", impl="torch", probes=2).block_probs(ld.q, ld.k) for li, ld in layers.items()}
for m in (128, 64, 32):
    sp = {li: subpool(ld.q, ld.k, m) for li, ld in layers.items()}
    for a in ((0.3,) if m == 128 else (0.3, 0.4)):
        sweep(f"P=2 + {a} subpool m={m} /8", {li: (1 - a) * pp2[li] + a * sp[li] for li in layers})
