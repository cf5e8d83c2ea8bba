"""Split the probe-vs-oracle recall gap into ranking (which blocks) and allocation (how many per row)."""
import sys, torch
from prism.eval.recall import LayerData, recall_at_density
from prism.metrics import attention_recall
from prism.masks import block_causal
from prism.scorers import build_scorer
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
L = int(sys.argv[1]); P = int(sys.argv[3]) if len(sys.argv) > 3 else 2
raw = torch.load(f"/tmp/cap/L{L}.pt")
TH = [0.3, 0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98, 0.99]
DENS = [0.10, 0.15, 0.20, 0.25, 0.30, 0.40]
sc_p = build_scorer("probe", impl="torch", probes=P, placement="shared")
def topn(score, n, forced, visible):
    s = torch.where(forced, torch.tensor(float("inf")), score)
    s = torch.where(visible, s, torch.tensor(float("-inf")))
    order = s.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1]).expand_as(order))
    return (rank < n[..., None]) & visible
curves = {k: [] for k in ["oracle", "probe", "probe-rank/oracle-count", "oracle-rank/probe-count"]}
per_layer = {}
data = {}
for li, d in raw.items():
    q, k, mass = d["q"], d["k"], d["mass"]
    visible, partial = block_causal(q.shape[2], k.shape[2], 128)
    nkb = visible.shape[1]
    forced = (partial | (torch.arange(nkb) == 0)) & visible
    tp = mass / mass.sum(-1, keepdim=True)
    pp = sc_p.block_probs(q, k)
    data[li] = (mass, visible, forced, tp, pp)
for th in TH:
    sc = build_scorer("probe", impl="torch", threshold=th)
    acc = {k: [0.0, 0.0] for k in curves}
    for li, (mass, visible, forced, tp, pp) in data.items():
        q = raw[li]["q"]; k = raw[li]["k"]
        O = sc.select_by_rule(q, k, tp).mask & visible
        E = sc.select_by_rule(q, k, pp).mask & visible
        nO = O.sum(-1); nE = E.sum(-1)
        masks = {"oracle": O, "probe": E,
                 "probe-rank/oracle-count": topn(pp, nO, forced, visible),
                 "oracle-rank/probe-count": topn(tp, nE, forced, visible)}
        for name, m in masks.items():
            acc[name][0] += float(attention_recall(mass, m).mean())
            acc[name][1] += float(m.sum(dim=(-2, -1)).float().mean() / visible.sum())
    for name in curves:
        curves[name].append((acc[name][1] / len(data), acc[name][0] / len(data)))
ref = [recall_at_density(curves["oracle"], x) for x in DENS]
for name, pts in curves.items():
    r = [recall_at_density(pts, x) for x in DENS]
    print(f"{name:26s}", " ".join("  –   " if a is None or b is None else f"{a - b:+.4f}" for a, b in zip(r, ref)), flush=True)
