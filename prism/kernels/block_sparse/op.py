"""Public entry point and ``torch.library`` op for the block-sparse attention forward.

``block_sparse_attention(q, k, v, block_mask, scale=None, return_lse=False)`` validates its inputs,
unpacks the BlockMask into tensors and calls the custom op ``torch.ops.prism.block_sparse_attn_fwd``.

The op is a ``torch.library.custom_op`` with a fake (meta) implementation, so a model that calls
it compiles with ``torch.compile(fullgraph=True)``: the op is opaque to the compiler and its
output shapes come from the fake implementation. (``torch.library.triton_op`` would let Inductor
see the Triton kernel, but it fails under compile on CPU-only machines, and an opaque op costs
nothing measurable around a long-context attention kernel.) Which implementation runs is chosen
per call by device:

* CUDA tensors: the Triton kernel (``triton_fwd.py``).
* CPU tensors with Triton's interpreter active (``TRITON_INTERPRET=1`` set before Triton was first
  imported): the same Triton kernel, interpreted (slow; for tests).
* CPU tensors otherwise (or Triton not installed): the float32 oracle
  (:func:`prism.kernels.reference.reference_attention`), cast back to the input dtype. This is a
  documented fallback, not an error: it is correct, and fine for short CPU runs; it holds
  ``O(B * Hq * chunk * Sk)`` scores per query chunk.

Forward only (pre-fill inference): no autograd formula is registered.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..reference import reference_attention

__all__ = ["block_sparse_attention", "validate_inputs", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

_triton_fwd = None
_triton_import_error: Exception | None = None


def _load_triton():
    """The Triton launcher module, or None when Triton is unavailable (imported lazily)."""
    global _triton_fwd, _triton_import_error
    if _triton_fwd is None and _triton_import_error is None:
        try:
            from . import triton_fwd as _tf

            _triton_fwd = _tf
        except Exception as e:  # ImportError, or a Triton without a usable backend
            _triton_import_error = e
    return _triton_fwd


def _use_triton(device: torch.device) -> bool:
    tf = _load_triton()
    if device.type == "cuda":
        if tf is None:
            raise RuntimeError(
                f"backend 'triton' needs the triton package on CUDA: {_triton_import_error!r}"
            )
        return True
    return tf is not None and tf.interpreter_active()


class _MaskView:
    """The BlockMask fields the reference fallback reads (a BlockMask itself cannot cross the op)."""

    def __init__(self, kv_num, kv_idx, full_num, full_idx, bs_q, bs_kv, sq, sk):
        self.kv_num_blocks, self.kv_indices = kv_num, kv_idx
        self.full_kv_num_blocks, self.full_kv_indices = full_num, full_idx
        self.BLOCK_SIZE = (bs_q, bs_kv)
        self.seq_lengths = (sq, sk)


@torch.library.custom_op("prism::block_sparse_attn_fwd", mutates_args=())
def block_sparse_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    full_kv_num_blocks: Optional[Tensor],  # noqa: UP045 (schema inference)
    full_kv_indices: Optional[Tensor],  # noqa: UP045
    bs_q: int,
    bs_kv: int,
    scale: float,
    return_lse: bool,
) -> tuple[Tensor, Tensor]:
    """Returns ``(out [B, Hq, Sq, D] in q.dtype, lse [B, Hq, Sq] float32)``; ``lse`` is an empty
    tensor unless ``return_lse``."""
    if _use_triton(q.device):
        out, lse = _triton_fwd.block_sparse_attention_triton(
            q,
            k,
            v,
            kv_num_blocks,
            kv_indices,
            full_kv_num_blocks,
            full_kv_indices,
            bs_q,
            bs_kv,
            scale,
            return_lse,
        )
    else:
        view = _MaskView(
            kv_num_blocks,
            kv_indices,
            full_kv_num_blocks,
            full_kv_indices,
            bs_q,
            bs_kv,
            q.shape[2],
            k.shape[2],
        )
        out, lse = reference_attention(
            q, k, v, view, scale, return_lse=True, compute_dtype=torch.float32
        )
    if not return_lse:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@block_sparse_attn_fwd.register_fake
def _(
    q,
    k,
    v,
    kv_num_blocks,
    kv_indices,
    full_kv_num_blocks,
    full_kv_indices,
    bs_q,
    bs_kv,
    scale,
    return_lse,
):
    B, Hq, Sq, D = q.shape
    out = q.new_empty((B, Hq, Sq, D))
    lse = q.new_empty((B, Hq, Sq) if return_lse else (0,), dtype=torch.float32)
    return out, lse


def validate_inputs(q, k, v, block_mask) -> None:
    """Raise TypeError / ValueError for inputs the kernel cannot run (see module docstring)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, H, S, D], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {q.dtype} not supported (bfloat16, float16, float32)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    Bk, Hkv, Sk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch mismatch: q has {B}, k/v have {Bk}")
    if Dk != D:
        raise ValueError(f"head dim mismatch: q has {D}, k/v have {Dk}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head dim {D} not supported by the Triton kernel (supported: {SUPPORTED_HEAD_DIMS})"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"GQA needs Hq % Hkv == 0, got Hq={Hq}, Hkv={Hkv}")
    if Sq > Sk:
        raise ValueError(
            f"Sq ({Sq}) must not exceed Sk ({Sk}): queries attend to a cached prefix plus themselves"
        )

    for attr in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "seq_lengths"):
        if not hasattr(block_mask, attr):
            raise TypeError(f"block_mask must be a FlexAttention BlockMask (missing {attr!r})")
    bs = block_mask.BLOCK_SIZE
    bs_q, bs_kv = (bs, bs) if isinstance(bs, int) else (int(bs[0]), int(bs[1]))
    for name, b in (("query", bs_q), ("key", bs_kv)):
        if b < 16 or b % 16 != 0:
            raise ValueError(
                f"{name} BLOCK_SIZE {b} cannot be tiled by the kernel (must be a multiple of 16)"
            )
    if tuple(int(s) for s in block_mask.seq_lengths) != (Sq, Sk):
        raise ValueError(
            f"block_mask was built for seq_lengths={tuple(block_mask.seq_lengths)} but got Sq={Sq}, Sk={Sk}"
        )
    kvn, kvi = block_mask.kv_num_blocks, block_mask.kv_indices
    fkn, fki = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    if kvn.dim() != 3 or kvi.dim() != 4:
        raise ValueError(
            f"block_mask kv_num_blocks must be [B, H, NQB] and kv_indices [B, H, NQB, W], "
            f"got {tuple(kvn.shape)} and {tuple(kvi.shape)}"
        )
    if (fkn is None) != (fki is None):
        raise ValueError(
            "block_mask full_kv_num_blocks and full_kv_indices must both be set or both None"
        )
    nqb = -(-Sq // bs_q)
    tensors = [("kv_num_blocks", kvn), ("kv_indices", kvi)]
    if fkn is not None:
        tensors += [("full_kv_num_blocks", fkn), ("full_kv_indices", fki)]
    for name, t in tensors:
        if t.device != q.device:
            raise ValueError(f"block_mask.{name} is on {t.device} but q is on {q.device}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"block_mask.{name} must be an integer tensor, got {t.dtype}")
        bm_b, bm_h, bm_m = t.shape[0], t.shape[1], t.shape[2]
        if bm_b not in (1, B):
            raise ValueError(f"block_mask batch dim is {bm_b}, expected 1 or B={B}")
        if bm_h not in (1, Hq):
            hint = " (expand per-KV-head selections to Hq)" if bm_h == Hkv else ""
            raise ValueError(f"block_mask head dim is {bm_h}, expected 1 or Hq={Hq}{hint}")
        if bm_m < nqb:
            raise ValueError(f"block_mask.{name} has {bm_m} query blocks, need ceil(Sq/BS)={nqb}")
    if kvn.shape[:3] != kvi.shape[:3] or (fkn is not None and fkn.shape[:3] != fki.shape[:3]):
        raise ValueError("block_mask num_blocks / indices shapes disagree")


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Block-sparse causal attention forward over a FlexAttention ``BlockMask``.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` with ``Sk >= Sq`` (a cached prefix of
            ``P = Sk - Sq`` tokens: query ``t`` sits at absolute position ``P + t``) and
            ``Hq % Hkv == 0`` (query head ``h`` reads KV head ``h // (Hq // Hkv)``). bf16 / fp16
            (fp32 accepted; exact ``ieee`` dots, slow), D in ``SUPPORTED_HEAD_DIMS``.
        block_mask: ``BlockMask`` with batch dim 1 or B, head dim 1 or Hq, BLOCK_SIZE multiple of 16
            (64 and 128 are the tuned ones), ``seq_lengths == (Sq, Sk)``. Partial blocks
            (``kv_num_blocks`` / ``kv_indices``) get the causal rule ``q_idx + P >= kv_idx`` —
            the ``mask_mod`` itself is not evaluated — and full blocks (``full_kv_*``) none; keys
            ``>= Sk`` are always masked. Preconditions not checked (they would need a device sync):
            the first ``num`` indices of each row are distinct, in ``[0, ceil(Sk/BS))``, and no block
            is both partial and full.
        scale: softmax scale (> 0), default ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp ``[B, Hq, Sq]`` in float32
            (``-inf`` on rows that see no key; their output is 0).

    Returns ``out [B, Hq, Sq, D]`` in q's dtype, or ``(out, lse)``.
    """
    validate_inputs(q, k, v, block_mask)
    bs = block_mask.BLOCK_SIZE
    bs_q, bs_kv = (bs, bs) if isinstance(bs, int) else (int(bs[0]), int(bs[1]))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    out, lse = torch.ops.prism.block_sparse_attn_fwd(
        q,
        k,
        v,
        block_mask.kv_num_blocks,
        block_mask.kv_indices,
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
        bs_q,
        bs_kv,
        float(scale),
        bool(return_lse),
    )
    if return_lse:
        return out, lse
    return out
