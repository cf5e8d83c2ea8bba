"""Block-sparse attention forward over FlexAttention BlockMasks (backend ``"triton"``).

    from prism.kernels.block_sparse import block_sparse_attention
    out = block_sparse_attention(q, k, v, block_mask, scale=None, return_lse=False)

* ``op.py``: validation, the public function and the ``torch.ops.prism.block_sparse_attn_fwd``
  custom op (CUDA → Triton kernel; CPU → Triton interpreter when active, else the oracle
  :func:`prism.kernels.reference.reference_attention`).
* ``triton_fwd.py``: the Triton kernel and its launcher (imported lazily: Triton is optional).
* ``naive.py``: old import path of the oracle (``naive_block_sparse_attention``: float32 output)
  and of the test mask builders, which live in :mod:`prism.testing`.

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
