"""FA4's block-sparse kernel vs dense cuDNN per unit of work, by sparse query-block size (GPU).

On Hopper, FlashAttention-4 picks its tile from the BlockMask's query block: for head dim <= 64
its best tile is 192 x 128, but a 128-row query block only divides by 128, so every Prism mask
(128 x 128 blocks) runs FA4's 128 x 128 tile (``flash_attn/cute/interface.py``,
``_tile_size_fwd_sm90``). This script measures what that costs: per query-block size ``bq``
(KV blocks stay 128) and density it builds a block-causal mask (the blocks cut by the diagonal
forced, the rest drawn at random per row to the target share of the causal area), runs it
through ``prism.kernels`` ``flex`` (-> FA4), and quotes the time against dense cuDNN SDPA on the
same Q/K/V in the same run: ``per_work`` = ms / (density x cuDNN ms), 1.0 = as cheap per score
as cuDNN. ``density=1`` is every causal block (FA4 as a dense kernel through the same path).

Before timing it checks every ``bq`` on a small ragged GQA shape against the fp32 reference and
refuses to report on a failure.

    python benchmarks/bench_fa4_tiles.py lengths=[32768,131072] q_blocks=[128,192,384]
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_model import cuda_time, open_log  # noqa: E402

from prism.kernels import get_backend, reference_attention  # noqa: E402
from prism.masks import block_causal, selection_to_block_mask  # noqa: E402


@dataclass
class Defaults:
    lengths: list = field(default_factory=lambda: [32768, 131072])
    q_blocks: list = field(default_factory=lambda: [128, 192, 384])
    densities: list = field(default_factory=lambda: [1.0, 0.18, 0.12])
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    kv_block: int = 128
    reps: int = 5
    out: str = "benchmarks/results/fa4_tiles"


_AREA: dict = {}


def causal_area(s: int, bq: int, bk: int, blocks: torch.Tensor) -> torch.Tensor:
    """Causal (query, key) pairs inside each block of the [NQB, NKB] grid (float64; cached)."""
    key = (s, bq, bk, str(blocks.device))
    if key not in _AREA:
        _AREA[key] = _causal_area(s, bq, bk, blocks)
    return _AREA[key]


def _causal_area(s: int, bq: int, bk: int, blocks: torch.Tensor) -> torch.Tensor:
    nqb, nkb = blocks.shape[-2:]
    q = torch.arange(s, device=blocks.device, dtype=torch.float64)
    # per query block: keys visible to each query = q + 1; pairs in KV block j = clamp overlap
    out = torch.zeros(nqb, nkb, dtype=torch.float64, device=blocks.device)
    qb = (q // bq).long()
    for j in range(nkb):
        lo, hi = j * bk, min((j + 1) * bk, s)
        seen = torch.clamp(q + 1 - lo, min=0, max=hi - lo)
        out[:, j] = torch.zeros(nqb, dtype=torch.float64, device=blocks.device).index_add_(
            0, qb, seen
        )
    return out


def random_selection(s, bq, bk, heads, density, gen, device) -> tuple[torch.Tensor, float]:
    """bool [1, heads, NQB, NKB]: the partial (diagonal) blocks and the sink, then random full
    blocks per row until ``density`` of the row's causal area; returns it and the realised
    density (selected causal pairs / all causal pairs)."""
    visible, partial = block_causal(s, s, (bq, bk), device)
    area = causal_area(s, bq, bk, visible)
    nqb, nkb = visible.shape
    sel = partial.clone()
    sel[:, 0] |= visible[:, 0]
    sel = sel[None, None].expand(1, heads, nqb, nkb).clone()
    if density < 1.0:
        full = visible & ~partial
        r = torch.rand(1, heads, nqb, nkb, generator=gen, device=device)
        r = torch.where(full, r, 2.0)  # only full blocks are candidates
        order = r.argsort(dim=-1)
        row_area = area.sum(-1)  # [NQB]
        need = (density * row_area - (sel.double() * area).sum(-1)).clamp(min=0)
        # full blocks have area bq * bk (one block is the unit): how many to add per row
        k = torch.ceil(need / (bq * bk)).long()
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(nkb, device=device).expand_as(order))
        sel |= (rank < k[..., None]) & full
    else:
        sel = visible[None, None].expand(1, heads, nqb, nkb).clone()
    got = float((sel.double() * area).sum() / (heads * area.sum()))
    return sel, got


def check(cfg: Defaults, say) -> None:
    """Every query-block size on ragged GQA shapes vs the fp32 reference; SystemExit on failure."""
    flex = get_backend("flex")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ok = True
    for s in (1000, 1537):
        q = torch.randn(1, cfg.heads, s, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, cfg.kv_heads, s, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for bq in cfg.q_blocks:
            sel, _ = random_selection(s, bq, cfg.kv_block, cfg.heads, 0.5, gen, "cuda")
            bm = selection_to_block_mask(sel, s, s, (bq, cfg.kv_block))
            ref = reference_attention(q.double(), k.double(), v.double(), bm).float()
            same = reference_attention(q, k, v, bm).float()
            tol = 2 * (same - ref).abs().max().item() + 2e-2
            out = flex(q, k, v, bm).float()
            err = (out - ref).abs().max().item()
            good = bool(torch.isfinite(out).all()) and err <= tol
            ok &= good
            say(
                f"check s={s} bq={bq}: max err {err:.4f} (tol {tol:.4f}) {'ok' if good else 'FAIL'}"
            )
    if not ok:
        raise SystemExit("check failed: no timings reported")


def run(cfg: Defaults) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = Path(cfg.out)
    say = open_log(out)

    say(f"# bench_fa4_tiles {time.strftime('%Y-%m-%d %H:%M:%S')} {asdict(cfg)}")
    from prism.kernels.flex import flash_available

    say(f"torch {torch.__version__}, GPU {torch.cuda.get_device_name()}, FA4 {flash_available()}")
    check(cfg, say)
    flex = get_backend("flex")
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for s in cfg.lengths:
        q = torch.randn(1, cfg.heads, s, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, cfg.kv_heads, s, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        g = cfg.heads // cfg.kv_heads
        ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        sdpa = functools.partial(F.scaled_dot_product_attention, q, ke, ve, is_causal=True)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn = cuda_time(sdpa, cfg.reps)
        del sdpa, ke, ve
        for d in cfg.densities:
            for bq in cfg.q_blocks:
                sel, got = random_selection(s, bq, cfg.kv_block, cfg.heads, d, gen, "cuda")
                bm = selection_to_block_mask(sel, s, s, (bq, cfg.kv_block))
                del sel
                ms = cuda_time(functools.partial(flex, q, k, v, bm), cfg.reps)
                row = {"length": s, "q_block": bq, "target": d, "density": round(got, 4),
                       "ms": round(ms, 3), "cudnn_ms": round(cudnn, 3),
                       "per_work": round(ms / (got * cudnn), 3)}  # fmt: skip
                rows.append(row)
                say(json.dumps(row))
                del bm
                torch.cuda.empty_cache()
    with open(f"{out}.csv", "w") as fh:
        keys = list(rows[0])
        fh.write(",".join(keys) + "\n")
        for r in rows:
            fh.write(",".join(str(r[k]) for k in keys) + "\n")


def main(argv=None) -> None:
    from prism.cli import parse_cli

    run(parse_cli(Defaults, argv, description=__doc__))


if __name__ == "__main__":
    main()
