import sys, torch
from prism.masks import block_causal
from prism.scorers import build_scorer
torch.set_num_threads(2)
raw = torch.load(f"/tmp/cap/L{sys.argv[1]}.pt")
for name, kw, th in [("probe", {}, 0.93), ("mix0.3", {"pooled_mix": 0.3}, 0.93), ("probe", {}, 0.95), ("mix0.3", {"pooled_mix": 0.3}, 0.9)]:
    sc = build_scorer("probe", impl="torch", threshold=th, **kw)
    recs, dens = [], []
    for li, d in raw.items():
        sel = sc(d["q"], d["k"]); m = d["mass"]
        vis, _ = block_causal(d["q"].shape[2], d["k"].shape[2], 128)
        keep = sel.mask & vis
        rr = (m * keep).sum(-1) / m.sum(-1)
        recs.append(rr.flatten()); dens.append(float(keep.sum() / (vis.sum() * m.shape[1])))
    r = torch.cat(recs)
    q = torch.quantile(r, torch.tensor([0.001, 0.01, 0.05, 0.5]))
    print(f"{name} th={th} dens {sum(dens)/len(dens):.4f} row recall mean {r.mean():.4f} q.1%/1%/5%/50% {[round(float(x),3) for x in q]} frac<0.5 {float((r<0.5).float().mean()):.4f} <0.8 {float((r<0.8).float().mean()):.4f}")
