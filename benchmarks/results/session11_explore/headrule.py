import sys, torch
from prism.eval.recall import recall_at_density
from prism.masks import block_causal
from prism.masks.select import top_p
from prism.metrics import attention_recall
from prism.scorers import build_scorer
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
L = int(sys.argv[1]); Ps = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else [2]
raw = torch.load(f"/tmp/cap/L{L}.pt")
DENS = [0.10, 0.15, 0.20, 0.25, 0.30, 0.40]
data = {}
for li, d in raw.items():
    q, k, mass = d["q"], d["k"], d["mass"]
    visible, partial = block_causal(q.shape[2], k.shape[2], 128)
    forced = (partial | (torch.arange(visible.shape[1]) == 0)) & visible
    data[li] = (mass, visible, forced)
def head_top_p(probs, visible, t):
    b, h, n, m = probs.shape
    flat = probs.masked_fill(~visible, -1.0).reshape(b, h, n * m)
    sv, order = flat.sort(dim=-1, descending=True, stable=True)
    sv = sv.clamp_min(0)
    before = sv.cumsum(-1) - sv
    keep_s = before < t * sv.sum(-1, keepdim=True)
    keep = torch.zeros_like(keep_s).scatter_(-1, order, keep_s)
    return keep.view(b, h, n, m) & visible
def curve(probs, rule, vals):
    pts = []
    for v in vals:
        R = D = 0.0
        for li, (mass, visible, forced) in data.items():
            m = rule(probs[li], visible, v) | forced
            R += float(attention_recall(mass, m).mean()); D += float(m.sum((-2, -1)).float().mean() / visible.sum())
        pts.append((D / len(data), R / len(data)))
    return [recall_at_density(pts, x) for x in DENS]
TH = [0.3, 0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98, 0.99, 0.995]
rowr = lambda p, vis, t: top_p(p, vis, t)
headr = lambda p, vis, t: head_top_p(p, vis, t)
def mixr(floor):
    return lambda p, vis, t: head_top_p(p, vis, t) | top_p(p, vis, floor * t)
norm = lambda p: p / p.sum(-1, keepdim=True)
tp = {li: norm(d[0]) for li, d in data.items()}
ref = curve(tp, rowr, TH)
def show(name, r):
    print(f"{name:30s}", " / ".join("  –   " if x is None else f"{x:.4f}" for x in r), "  gap", " ".join("  –  " if a is None or b is None else f"{a - b:+.4f}" for a, b in zip(r, ref)), flush=True)
show("oracle top_p (row)", ref)
show("oracle head top_p", curve(tp, headr, TH))
for P in Ps:
    pp = {li: build_scorer("probe", impl="torch", probes=P).block_probs(raw[li]["q"], raw[li]["k"]) for li in data}
    show(f"P={P} row top_p", curve(pp, rowr, TH))
    show(f"P={P} head top_p", curve(pp, headr, TH))
    for f in (0.5, 0.8):
        show(f"P={P} head ∪ row({f}·t)", curve(pp, mixr(f), TH))
