import sys, time, torch
from pathlib import Path
from prism.eval.config import load_experiment
from prism.eval.runner import Runner
ROOT = Path("/work/main")
L = int(sys.argv[1]); threads = int(sys.argv[2])
torch.set_num_threads(threads)
ov = ["progress=false", f"length=[{L}]"]
if L > 8192:
    ov.append("model.rope_scaling={rope_type: yarn, factor: 4.0, original_max_position_embeddings: 8192}")
cfg = load_experiment(ROOT / "prism/configs/experiments/probe_topp_oracle_recall.yaml", ov)
r = Runner(cfg)
pt = next(p for p in r.points if p["length"] == L)
t0 = time.time()
layers = r.layer_data(pt)
out = {}
for li, ld in layers.items():
    out[li] = dict(q=ld.q, k=ld.k, mass=ld.mass, bs=ld.block_size, chunk=ld.chunk)
    print(li, time.time() - t0, flush=True)
torch.save(out, f"/tmp/cap/L{L}.pt")
print("done", time.time() - t0, flush=True)
