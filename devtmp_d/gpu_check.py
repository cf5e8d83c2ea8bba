"""Device check for helper D: old vs new fused kernel timing, variants compile, bench functions."""
import sys, time, math
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch, triton, triton.testing
import old_pf
import bench_estimator as b
from prism.kernels.estimation import prism_select_block_lists, pick_select_config
from prism.scorers.prism import PrismConfig, PrismScorer

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
cfg = PrismConfig()
params = PrismScorer(cfg).kernel_params(128)
for s in (8192, 32768, 131072):
    q, k = b.synth_qk(1, 32, 8, s, 128, 0, torch.bfloat16)
    old = old_pf.prism_select_block_lists(q, k, cfg)
    new = prism_select_block_lists(q, k, params)
    same = all(torch.equal(x, y) for x, y in zip(old, new))
    t_new = b.bench(lambda: prism_select_block_lists(q, k, params))
    t_old = b.bench(lambda: old_pf.prism_select_block_lists(q, k, cfg))
    t_new2 = b.bench(lambda: prism_select_block_lists(q, k, params))
    print(f"S={s} identical={same} old_ms={t_old:.3f} new_ms={t_new:.3f} new_ms_again={t_new2:.3f}", flush=True)
    del q, k
    torch.cuda.empty_cache()
rows = b.check(cfg, [(4096, 0), (3000, 257)], [torch.float32, torch.bfloat16])
print("check ok:", all(r["diff_rows"] == 0 or r["dtype"] == "bfloat16" for r in rows), flush=True)
for s, variants, pools in b.sweep_plan([8192, 32768]):
    b.sweep(cfg, s, variants, pools)
