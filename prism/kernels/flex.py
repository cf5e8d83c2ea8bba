"""The ``flex`` backend: compiled torch FlexAttention over the BlockMask.

``flex_attention`` must be compiled: called eagerly it ignores the block lists. We compile it
once and cache it; inside an outer ``torch.compile`` the plain function is called instead.
On Hopper/Blackwell with FlashAttention-4 (``flash_attn.cute``) installed, FlexAttention's FLASH
backend is picked automatically (``backend="flex"``); ``flex_triton`` / ``flex_flash`` force one.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

_COMPILED = None


def _compile_limits():
    """Dynamo config for our compiled flex_attention calls.

    Past its recompile limit (8 by default) Dynamo silently runs a function eagerly, and eager
    ``flex_attention`` ignores the block lists: a sparse mask would silently run dense. Every new
    (dtype, D, block size, GQA, ...) combination is one recompile, so we allow more and make
    hitting the limit an error instead of a silent fallback.
    """
    cfg = torch._dynamo.config
    opts = {}
    if hasattr(cfg, "recompile_limit"):
        opts["recompile_limit"] = max(cfg.recompile_limit, 64)
    else:  # older torch
        opts["cache_size_limit"] = max(cfg.cache_size_limit, 64)
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        opts["fail_on_recompile_limit_hit"] = True
    return cfg.patch(**opts)


def compiled_flex_attention():
    """The process-wide compiled ``flex_attention``."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention)
    return _COMPILED


_FLASH_OK: dict[int, bool] = {}


def flash_available(device_index: int = 0) -> bool:
    """True where FlexAttention's FLASH (FA4 CuTe-DSL) backend can run: CUDA sm90+ and
    ``flash_attn.cute`` importable. Probed once per device, in eager mode."""
    if device_index not in _FLASH_OK:
        ok = torch.cuda.is_available() and torch.cuda.get_device_capability(device_index)[0] >= 9
        if ok:
            try:
                import flash_attn.cute  # noqa: F401
            except Exception:
                ok = False
        _FLASH_OK[device_index] = ok
    return _FLASH_OK[device_index]


def _kernel_options(q: torch.Tensor, block_mask: BlockMask, impl: str) -> dict | None:
    opts: dict = {}
    bs_q, bs_k = block_mask.BLOCK_SIZE
    if q.is_cuda and min(bs_q, bs_k) < 128:
        # the mask block must be a multiple of the kernel tile
        opts.update(BLOCK_M=bs_q, BLOCK_N=bs_k)
    idx = q.device.index or 0
    # under torch.compile the probe (an import) cannot be traced: use what eager mode found
    # (the first eager call probes it; unknown -> FlexAttention's Triton backend)
    if not q.is_cuda:
        available = False
    elif torch.compiler.is_compiling():
        available = _FLASH_OK.get(idx, False)
    else:
        available = flash_available(idx)
    use_flash = impl == "flash" or (impl == "auto" and available)
    if impl == "flash" and not available:
        raise RuntimeError(
            "backend 'flex_flash' needs a CUDA GPU of compute capability >= 9.0 and FlashAttention-4 "
            "(pip install 'prism-sparse[fa4]'); use backend='flex' to fall back automatically"
        )
    if use_flash:
        opts["BACKEND"] = "FLASH"
    return opts or None


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> [B, Hq, Sq, D]; GQA without repeating K/V."""
    kwargs = dict(
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=_kernel_options(q, block_mask, impl),
    )
    if torch.compiler.is_compiling():  # inside the caller's graph: the plain function
        return flex_attention(q, k, v, **kwargs)
    with _compile_limits():
        return compiled_flex_attention()(q, k, v, **kwargs)
