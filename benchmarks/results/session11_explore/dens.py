import sys, torch
from prism.eval.recall import LayerData, evaluate_scorer
from prism.scorers import build_scorer
torch.set_num_threads(1)
raw = torch.load("/tmp/cap/L8192.pt")
layers = {}
for li, d in raw.items():
    ld = LayerData(d["q"], d["k"], d["bs"], d["chunk"]); ld._mass = d["mass"]; layers[li] = ld
sc = build_scorer("probe", impl="torch")
pp = {li: sc.block_probs(ld.q, ld.k) for li, ld in layers.items()}
for th in [0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99]:
    r = evaluate_scorer(build_scorer("probe", impl="torch", threshold=th), layers, pp); print("top_p", th, round(r["density"], 4), round(r["recall"], 4))
for mp in [0.01, 0.005, 0.003, 0.002, 0.0015, 0.001, 0.0007, 0.0005, 0.0003, 0.0002]:
    r = evaluate_scorer(build_scorer("probe", impl="torch", rule="min_prob", min_prob=mp), layers, pp); print("min_prob", mp, round(r["density"], 4), round(r["recall"], 4))
