"""How much attention work coarser query blocks cost at equal recall: the block-mass oracle (CPU).

For the embedded SmolLM2-135M on real text (``pydoc`` corpus, float32, YaRN past 8K) it captures
post-RoPE Q/K of a few layers, computes every query's exact causal softmax summed into 128-key
blocks, and for query blocks of BSQ rows (128, 192, 256, 384) keeps, per (head, query block),
the fewest KV blocks reaching ``recall`` of the block row's mass, plus the blocks the diagonal
cuts (a kernel computes them anyway). ``work`` = selected (query row, KV block) pairs that are
causally visible / all visible pairs: the share of dense attention a kernel at that grid does.
The question it answers: does a 192-row query block (FA4's best tile for D <= 64 on Hopper)
need many more blocks than a 128-row one at the same recall?

    python benchmarks/study_qblock_oracle.py length=8192 recall=0.95
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_model import open_log  # noqa: E402

from prism.eval.modeling import capture_qk, corpus_tokens, load_model  # noqa: E402
from prism.metrics import block_attention_mass  # noqa: E402


@dataclass
class Defaults:
    length: int = 8192
    recall: float = 0.95
    layers: list = field(default_factory=lambda: [2, 8, 15, 22, 29])
    q_blocks: list = field(default_factory=lambda: [128, 192, 256, 384])
    kv_block: int = 128
    out: str = "benchmarks/results/qblock_oracle"


def oracle_work(mass: torch.Tensor, bq: int, bk: int, recall: float) -> float:
    """Share of the causal (query, KV block) pairs an oracle at ``recall`` keeps on a grid of
    ``bq``-row query blocks (``mass`` [Hq, S, NKB]: each query's exact causal softmax summed into
    KV blocks of ``bk`` keys, ``block_attention_mass`` on a (1, BSK) grid)."""
    hq, s, nkb = mass.shape
    j = torch.arange(nkb)
    kept = 0
    for t in range(math.ceil(s / bq)):
        lo, hi = t * bq, min((t + 1) * bq, s)
        m = mass[:, lo:hi].sum(1)  # [Hq, NKB]
        srt, order = m.sort(-1, descending=True)
        need = (srt.cumsum(-1) < recall * m.sum(-1, keepdim=True)).sum(-1) + 1
        rank = torch.empty_like(order).scatter_(-1, order, j.expand_as(order))
        sel = rank < need[:, None]
        sel[:, lo // bk : (hi - 1) // bk + 1] = True  # the diagonal blocks
        vis = j[None, :] * bk <= torch.arange(lo, hi)[:, None]  # [rows, NKB]
        kept += int((sel[:, None, :] & vis[None]).sum())
    rows = torch.arange(s)
    total = int((j[None, :] * bk <= rows[:, None]).sum()) * hq
    return kept / total


def main(argv=None) -> None:
    from prism.cli import parse_cli

    cfg = parse_cli(Defaults, argv, description=__doc__)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    say = open_log(Path(cfg.out))

    say(f"# study_qblock_oracle {time.strftime('%Y-%m-%d %H:%M:%S')} {asdict(cfg)}")
    rope = None
    if cfg.length > 8192:
        rope = {"rope_type": "yarn", "factor": cfg.length / 8192,
                "original_max_position_embeddings": 8192}  # fmt: skip
    model, tok = load_model("default", rope_scaling=rope)
    ids = corpus_tokens(tok)[: cfg.length][None]
    cap = capture_qk(model, ids, cfg.layers)
    say("layer | " + " | ".join(f"work BSQ={b}" for b in cfg.q_blocks))
    sums = [0.0] * len(cfg.q_blocks)
    for layer, (q, k) in cap.items():
        mass = block_attention_mass(q.float(), k.float(), (1, cfg.kv_block), chunk=1024)[0]
        w = [oracle_work(mass, b, cfg.kv_block, cfg.recall) for b in cfg.q_blocks]
        sums = [a + b for a, b in zip(sums, w)]
        say(f"{layer} | " + " | ".join(f"{x:.4f} ({x / w[0]:.3f}x)" for x in w))
    mean = [x / len(cap) for x in sums]
    say("mean | " + " | ".join(f"{x:.4f} ({x / mean[0]:.3f}x)" for x in mean))


if __name__ == "__main__":
    main()
