"""GPU check of the Hugging Face integration (tiny random Llama / Qwen3 on CUDA, bf16).

For each family and backend (flex, triton): patched at threshold=1.0 equals unpatched SDPA within
bf16 error; at threshold=0.9 the pre-fill is sparse (density < 1) and close to dense; chunked
pre-fill with a cached prefix runs; torch.compile(fullgraph=True) of the patched model (flex) gives
the eager result. Prints one line per check; exits non-zero on a failure.

    python benchmarks/check_hf_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config  # noqa: E402

import prism  # noqa: E402

FAMILIES = {"llama": LlamaConfig, "qwen3": Qwen3Config}


def tiny(family: str):
    cfg = FAMILIES[family](
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    return (
        AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").cuda().bfloat16().eval()
    )


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def main() -> int:
    ok = True
    ids = torch.randint(3, 1024, (2, 3000), generator=torch.Generator().manual_seed(1)).cuda()
    for fam in FAMILIES:
        model = tiny(fam)
        dense = model(input_ids=ids).logits
        for backend in ("flex", "triton"):
            prism.patch_model(model, threshold=1.0, backend=backend)
            full = model(input_ids=ids).logits
            e1 = rel(full, dense)
            prism.patch_model(model, threshold=0.9, backend=backend)
            with prism.collect_stats(model) as st:
                sparse = model(input_ids=ids).logits
            e2 = rel(sparse, dense)
            out = model(input_ids=ids[:, :2000], use_cache=True)
            nxt = model(input_ids=ids[:, 2000:], past_key_values=out.past_key_values).logits
            e3 = rel(nxt, sparse[:, 2000:])
            good = e1 < 2e-2 and st.overall_density < 1.0 and e2 < 0.2 and e3 < 0.2
            ok &= good
            print(
                f"{fam}/{backend}: thr1 err {e1:.2e}  thr0.9 density {st.overall_density:.3f} "
                f"err {e2:.2e}  chunked-vs-oneshot err {e3:.2e}  {'OK' if good else 'FAIL'}",
                flush=True,
            )
            prism.unpatch_model(model)
        prism.patch_model(model, threshold=0.9, backend="flex")
        eager = model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(model, fullgraph=True)
        comp = compiled(input_ids=ids, use_cache=False).logits
        e4 = rel(comp, eager)
        good = e4 < 2e-2
        ok &= good
        print(
            f"{fam}/compile fullgraph flex: err vs eager {e4:.2e}  {'OK' if good else 'FAIL'}",
            flush=True,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
