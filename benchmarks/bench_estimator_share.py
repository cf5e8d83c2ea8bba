"""Estimator + BlockMask vs sparse kernel, device time only, on the real model's Q/K/V.

The embedded SmolLM2-135M on real text (``bench_model``'s loader, text and YaRN), Q/K/V of all
30 layers captured from a dense forward at each length. Every loop below runs over the 30 layers
and is captured once in a CUDA graph and replayed (so no host overhead is counted):

* ``est_ms``: Prism's default scorer, ``scorer(q, k).block_mask()`` (both estimator launches
  and the BlockMask build); ``est_default_lists_ms``: the two launches alone;
  ``est_g1_lists_ms``: the same with the select kernel's rows taken one query head at a time
  (``block_g=1``) instead of the GQA group padded to a power of two (SmolLM2 has G = 3: 4 row
  slots, one idle); ``g1_lists_equal_default``: its block lists equal the default's;
* ``kernel_ms``: the ``flex`` backend over those BlockMasks; ``cudnn_ms``: dense causal cuDNN
  SDPA on the same tensors (K/V expanded);
* ``est_share``: est / (est + kernel), the issue's "estimator + mask <= 10 %" quantity.

    python benchmarks/bench_estimator_share.py gguf=PATH lengths=[32768,131072]
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_model as bm  # noqa: E402

import prism  # noqa: E402
from prism.kernels import get_backend  # noqa: E402
from prism.kernels.estimation.op import prism_select_block_lists  # noqa: E402
from prism.kernels.estimation.select import pick_select_config  # noqa: E402


@dataclass
class Defaults:
    gguf: str = ""
    lengths: list = field(default_factory=lambda: [32768, 131072])
    backend: str = "flex"
    reps: int = 5
    out: str = "benchmarks/results/estimator_share_h200"


def one_length(model, ids, scorer, backend, reps: int) -> dict:
    """The row of one length (ids [1, S])."""
    length = ids.shape[1]
    bm._CAPTURED.clear()
    with bm.attn_impl(model, "bench_capture"):
        bm.prefill(model, ids)
    caps = list(bm._CAPTURED)
    bm._CAPTURED.clear()
    q0, k0 = caps[0][0], caps[0][1]
    params = scorer.kernel_params(q0.shape[-1])
    g = q0.shape[1] // k0.shape[1]
    default = pick_select_config(g, -(-length // 128), "cuda")
    one = dataclasses.replace(default, block_g=1, block_q=16)
    a = [prism_select_block_lists(q, k, params) for q, k, _ in caps]
    b = [prism_select_block_lists(q, k, params, one) for q, k, _ in caps]
    same = all(all(torch.equal(x, y) for x, y in zip(la, lb)) for la, lb in zip(a, b))
    bms = [scorer(q, k).block_mask() for q, k, _ in caps]
    row = {"length": length, "G": g, "default_select": dataclasses.asdict(default)}
    row["est_ms"] = bm.graph_ms(lambda: [scorer(q, k).block_mask() for q, k, _ in caps], reps)
    row["est_default_lists_ms"] = bm.graph_ms(
        lambda: [prism_select_block_lists(q, k, params) for q, k, _ in caps], reps
    )
    row["est_g1_lists_ms"] = bm.graph_ms(
        lambda: [prism_select_block_lists(q, k, params, one) for q, k, _ in caps], reps
    )
    row["g1_lists_equal_default"] = same
    row["kernel_ms"] = bm.graph_ms(
        lambda: [backend(q, k, v, m) for (q, k, v), m in zip(caps, bms)], reps
    )
    exp = [(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)) for q, k, v in caps]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            for q, k, v in exp:
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

    row["cudnn_ms"] = bm.graph_ms(cudnn, reps)
    row["est_share"] = row["est_ms"] / (row["est_ms"] + row["kernel_ms"])
    row["density"] = float(sum(scorer(q, k).density for q, k, _ in caps) / len(caps))
    return row


@torch.no_grad()
def main(argv=None) -> None:
    from prism.cli import parse_cli

    cfg = parse_cli(Defaults, argv, description=__doc__)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{cfg.out}.log", "a")

    def say(msg):
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    say(f"# bench_estimator_share {time.strftime('%Y-%m-%d %H:%M:%S')} {cfg}")
    say(f"torch {torch.__version__}, FA4 {prism.kernels.flex.flash_available()}")
    bm.register_helpers()
    model, tok = bm.load(bm.Defaults(gguf=cfg.gguf), max(cfg.lengths))
    ids_all = bm.token_ids(tok, max(cfg.lengths), model.config.vocab_size).cuda()
    scorer = prism.build_scorer("prism")
    backend = get_backend(cfg.backend)
    for length in cfg.lengths:
        bm.set_rope(model, length)
        row = one_length(model, ids_all[None, :length], scorer, backend, cfg.reps)
        torch.cuda.empty_cache()
        say(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
