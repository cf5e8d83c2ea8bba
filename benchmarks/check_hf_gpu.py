"""GPU check of the Hugging Face integration (tiny random Llama / Qwen3 on CUDA, bf16).

For each family and backend (flex, triton): patched at threshold=1.0 equals unpatched SDPA within
bf16 error; at threshold=0.9 the pre-fill is sparse (density < 1) and close to dense; chunked
pre-fill with a cached prefix runs; torch.compile(fullgraph=True) of the patched model (flex) gives
the eager result. Prints one line per check; exits non-zero on a failure.

    python benchmarks/check_hf_gpu.py [families=[llama,qwen3]] [backends=[flex,triton]]
        [length=3000] [prefix=2000] [threshold=0.9]

(omegaconf ``key=value`` overrides through :func:`prism.cli.parse_cli`; ``-h`` lists the keys.)
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import prism  # noqa: E402
from prism.cli import parse_cli  # noqa: E402
from prism.models import tiny_model  # noqa: E402

VOCAB = 1024


@dataclasses.dataclass
class Args:
    families: list[str] = dataclasses.field(default_factory=lambda: ["llama", "qwen3"])
    backends: list[str] = dataclasses.field(default_factory=lambda: ["flex", "triton"])
    length: int = dataclasses.field(default=3000, metadata={"help": "tokens per sequence"})
    prefix: int = dataclasses.field(
        default=2000, metadata={"help": "cached prefix of the chunked pre-fill check"}
    )
    threshold: float = 0.9
    batch: int = 2


def tiny(family: str):
    """A random 2-layer model, Hq=8, Hkv=2, D=64 (:func:`prism.models.tiny_model`), bf16 on CUDA."""
    model = tiny_model(
        family,
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=8192,
    )
    return model.cuda().bfloat16().eval()


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_cli(Args, argv, description=__doc__, prog="benchmarks/check_hf_gpu.py")
    if not 0 < args.prefix < args.length:
        sys.exit(f"error: need 0 < prefix < length, got prefix={args.prefix}, length={args.length}")
    ok = True
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (args.batch, args.length), generator=g).cuda()
    p = args.prefix
    for fam in args.families:
        model = tiny(fam)
        dense = model(input_ids=ids).logits
        for backend in args.backends:
            prism.patch_model(model, threshold=1.0, backend=backend, min_len=256)
            full = model(input_ids=ids).logits
            e1 = rel(full, dense)
            prism.patch_model(model, threshold=args.threshold, backend=backend, min_len=256)
            with prism.collect_stats(model) as st:
                sparse = model(input_ids=ids).logits
            e2 = rel(sparse, dense)
            out = model(input_ids=ids[:, :p], use_cache=True)
            nxt = model(input_ids=ids[:, p:], past_key_values=out.past_key_values).logits
            e3 = rel(nxt, sparse[:, p:])
            good = e1 < 2e-2 and st.overall_density < 1.0 and e2 < 0.2 and e3 < 0.2
            ok &= good
            print(
                f"{fam}/{backend}: thr1 err {e1:.2e}  thr{args.threshold:g} density "
                f"{st.overall_density:.3f} err {e2:.2e}  chunked-vs-oneshot err {e3:.2e}  "
                f"{'OK' if good else 'FAIL'}",
                flush=True,
            )
            prism.unpatch_model(model)
        prism.patch_model(model, threshold=args.threshold, backend="flex", min_len=256)
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
