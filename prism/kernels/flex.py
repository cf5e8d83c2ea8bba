"""The ``flex`` backend: compiled torch FlexAttention over the BlockMask.

``flex_attention`` must be compiled: called eagerly it ignores the block lists. We compile it
once and cache it; inside an outer ``torch.compile`` the plain function is called instead.
On Hopper/Blackwell with FlashAttention-4 (``flash_attn.cute``) installed, FlexAttention's FLASH
backend is picked automatically (``backend="flex"``); ``flex_triton`` / ``flex_flash`` force one.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..masks.blockmask import block_mask_from_lists, is_causal_mask_mod, is_flash_safe_mask_mod

_COMPILED: dict = {}


def _compiled(fn):
    """``torch.compile(fn)``, compiled once per process and cached."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


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
    return _compiled(flex_attention)


_FLASH_OK: dict[int, bool] = {}
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


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
    bs_q, bs_k = block_mask.BLOCK_SIZE
    tile: dict = {}
    if q.is_cuda and (bs_q % 128 or bs_k % 128):
        # the mask block must be a multiple of the kernel tile (a power of two <= 128): the
        # largest power of two dividing it (16/32/64 for square blocks below 128, as before;
        # 64 for a rectangular grid's 192-row query block)
        tile = {"BLOCK_M": min(bs_q & -bs_q, 128), "BLOCK_N": min(bs_k & -bs_k, 128)}
    idx = q.device.index or 0
    # under torch.compile the probe (an import) cannot be traced: use what eager mode found
    # (the first eager call probes it; unknown -> FlexAttention's Triton backend)
    if not q.is_cuda:
        available = False
    elif torch.compiler.is_compiling():
        available = _FLASH_OK.get(idx, False)
    else:
        available = flash_available(idx)
    # FA4 takes half-precision inputs only: float32 runs on FlexAttention's Triton backend
    half = q.dtype in _FLASH_DTYPES
    use_flash = impl == "flash" or (
        impl == "auto" and available and half and is_flash_safe_mask_mod(block_mask.mask_mod)
    )
    if impl == "flash" and not available:
        raise RuntimeError(
            "backend 'flex_flash' needs a CUDA GPU of compute capability >= 9.0 and FlashAttention-4 "
            "(pip install 'prism-sparse[fa4]'); use backend='flex' to fall back automatically"
        )
    if impl == "flash" and not half:
        raise ValueError(
            f"backend 'flex_flash' (FlashAttention-4) takes float16 / bfloat16 inputs, got "
            f"{q.dtype}; use backend='flex' (float32 runs on FlexAttention's Triton backend)"
        )
    opts: dict = {"BACKEND": "FLASH"} if use_flash else {}
    # square blocks: the tile goes to either backend, as before; on a rectangular grid only
    # FlexAttention's Triton kernel takes it (FA4 picks its own: 192 x 128 for D <= 64)
    if not use_flash or bs_q == bs_k:
        opts.update(tile)
    return opts or None


def _offset_flex(q, k, v, kv_num, kv_idx, full_num, full_idx, offset, block_size, scale, gqa, opts):
    """flex_attention over causal block lists with a cached prefix: the BlockMask is rebuilt
    here, inside the compiled region, with the queries' absolute positions read from ``offset``
    (int32 [Sq] = ``Sk - Sq + arange(Sq)``, an input of the compiled function) instead of a
    captured Python int, which Dynamo turns into a dynamic scalar that FA4 (FLASH backend)
    rejects; FA4 also rejects a scalar read of a captured tensor (``offset[0]``), not a read
    indexed by ``q_idx``."""

    def mask_mod(b, h, q_idx, kv_idx):
        return offset[q_idx] >= kv_idx

    bm = block_mask_from_lists(
        kv_num, kv_idx, full_num, full_idx, mask_mod, q.shape[2], k.shape[2], block_size
    )
    return flex_attention(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa, kernel_options=opts)


_OFFSETS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _offset_tensor(prefix: int, sq: int, device: torch.device) -> torch.Tensor:
    """The absolute positions of the queries, ``prefix + arange(Sq)``: a cached int32 [Sq]
    device tensor (no host->device copy per call)."""
    key = (int(prefix), int(sq), device)
    if key not in _OFFSETS:
        if len(_OFFSETS) > 256:
            _OFFSETS.clear()
        _OFFSETS[key] = torch.arange(
            int(prefix), int(prefix) + sq, dtype=torch.int32, device=device
        )
    return _OFFSETS[key]


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> [B, Hq, Sq, D]; GQA without repeating K/V.

    Prism's causal ``mask_mod`` (:func:`prism.masks.blockmask.causal_mask_mod`) captures nothing
    when Sk == Sq; with a cached prefix (eager call) the mask is rebuilt by :func:`_offset_flex`
    with the offset as a device tensor. Both are FA4-safe. Any other ``mask_mod`` runs as given.
    """
    gqa = q.shape[1] != k.shape[1]
    opts = _kernel_options(q, block_mask, impl)
    prefix = k.shape[2] - q.shape[2]
    if (
        not torch.compiler.is_compiling()
        and is_causal_mask_mod(block_mask.mask_mod)
        and prefix != 0
        and tuple(block_mask.seq_lengths) == (q.shape[2], k.shape[2])
    ):
        args = (
            q,
            k,
            v,
            block_mask.kv_num_blocks,
            block_mask.kv_indices,
            block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices,
            _offset_tensor(prefix, q.shape[2], q.device),
            block_mask.BLOCK_SIZE,
            scale,
            gqa,
            opts,
        )
        with _compile_limits():
            return _compiled(_offset_flex)(*args)
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=gqa, kernel_options=opts)
    if torch.compiler.is_compiling():  # inside the caller's graph: the plain function
        return flex_attention(q, k, v, **kwargs)
    with _compile_limits():
        return compiled_flex_attention()(q, k, v, **kwargs)
