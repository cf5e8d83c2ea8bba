"""Block-sparse attention forward over FlexAttention BlockMasks (backend ``"triton"``).

    from prism.kernels.block_sparse import block_sparse_attention
    out = block_sparse_attention(q, k, v, block_mask, scale=None, return_lse=False)

* ``op.py``: validation, the public function and the ``torch.ops.prism.block_sparse_attn_fwd``
  custom op (CUDA → Triton kernel; CPU → Triton interpreter when active, else the naive path).
* ``triton_fwd.py``: the Triton kernel and its launcher (imported lazily: Triton is optional).
* ``naive.py``: the float32 reference used by the tests.

Importing this package needs only torch (no Triton, no omegaconf).
"""

from .naive import dense_block_maps, naive_block_sparse_attention
from .op import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, block_sparse_attention, validate_inputs

__all__ = [
    "block_sparse_attention",
    "naive_block_sparse_attention",
    "dense_block_maps",
    "validate_inputs",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_DTYPES",
]
