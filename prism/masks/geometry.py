"""Block-causal geometry of a (possibly cached-prefix) causal attention pattern.

Shape vocabulary: Sq queries, Sk keys (Sk >= Sq), P = Sk - Sq cached-prefix length, BS block size,
NQB = ceil(Sq / BS), NKB = ceil(Sk / BS). Query block i lives on the query-local grid and query t
sits at absolute position P + t.

* query block i may see KV block j  iff  j*BS <= P + min((i+1)*BS, Sq) - 1
* a visible block is *partial* (cut by the causal frontier) iff  j*BS + BS - 1 > P + i*BS

A *rectangular* grid has query blocks of BSQ rows and KV blocks of BSK columns (``block_size``
given as the pair ``(BSQ, BSK)``; an int is the square ``(BS, BS)``): NQB = ceil(Sq / BSQ),
NKB = ceil(Sk / BSK), and the two rules read ``j*BSK <= P + min((i+1)*BSQ, Sq) - 1`` and
``j*BSK + BSK - 1 > P + i*BSQ``. It exists for FlashAttention-4 on Hopper, whose best tile for
head dims <= 64 is 192 x 128 (a 128-row query block forces its 128 x 128 tile).
"""

from __future__ import annotations

import functools
import math

import torch

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)
#: query-block sizes of a rectangular grid (``q_block_size``): the square sizes and 192 / 384
#: (FA4's 192-row tile on Hopper for head dims <= 64)
SUPPORTED_Q_BLOCK_SIZES = (16, 32, 64, 128, 192, 256, 384)


def check_block_size(block_size: int) -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(
            f"unsupported block_size {block_size}; supported block sizes: {list(SUPPORTED_BLOCK_SIZES)}"
        )
    return block_size


def check_q_block_size(q_block_size: int) -> int:
    """``q_block_size``: 0 (= ``block_size``, square blocks) or one of
    :data:`SUPPORTED_Q_BLOCK_SIZES`."""
    if not isinstance(q_block_size, int) or isinstance(q_block_size, bool):
        raise TypeError(f"q_block_size must be an int, got {type(q_block_size).__name__}")
    if q_block_size != 0 and q_block_size not in SUPPORTED_Q_BLOCK_SIZES:
        raise ValueError(
            f"unsupported q_block_size {q_block_size}; 0 (= block_size) or one of "
            f"{list(SUPPORTED_Q_BLOCK_SIZES)}"
        )
    return q_block_size


def block_dims(block_size: int | tuple[int, int]) -> tuple[int, int]:
    """``(BSQ, BSK)`` of a block size given as an int (square) or a ``(BSQ, BSK)`` pair."""
    if isinstance(block_size, (tuple, list)):
        bq, bk = block_size
        return bq, bk
    return block_size, block_size


def grid_block_size(bq: int, bk: int) -> int | tuple[int, int]:
    """The block size of a ``BSQ x BSK`` grid as Prism passes it around: an int when square
    (every existing caller), the pair otherwise."""
    return bq if bq == bk else (bq, bk)


def num_blocks(length: int, block_size: int) -> int:
    return math.ceil(length / block_size)


def grid_shape(sq: int, sk: int, block_size: int | tuple[int, int]) -> tuple[int, int]:
    """``(NQB, NKB)`` of the block grid."""
    bq, bk = block_dims(block_size)
    # integer arithmetic: under torch.compile the lengths may be symbolic sizes
    return (sq + bq - 1) // bq, (sk + bk - 1) // bk


def _geometry(sq: int, sk: int, bq: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    nqb, nkb = num_blocks(sq, bq), num_blocks(sk, bk)
    p = sk - sq
    i = torch.arange(nqb).unsqueeze(1)
    j = torch.arange(nkb).unsqueeze(0)
    last_q = (
        p + torch.clamp((i + 1) * bq, max=sq) - 1
    )  # absolute position of the block's last query
    visible = j * bk <= last_q
    partial = visible & (j * bk + bk - 1 > p + i * bq)
    return visible, partial


def block_causal(
    sq: int, sk: int, block_size: int | tuple[int, int], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(visible, partial)``, both bool ``[NQB, NKB]`` (``block_size``: BS or the pair
    ``(BSQ, BSK)`` of a rectangular grid).

    ``visible``: query block i may attend to some key of KV block j (block-causal).
    ``partial``: visible blocks the causal frontier cuts (the "diagonal" blocks); they need the
    token-level causal mask. Everything visible and not partial is a full block.
    """
    if sq > sk:
        raise ValueError(f"Sq ({sq}) must be <= Sk ({sk})")
    # the cache saves host work in eager mode; under torch.compile it only makes Dynamo warn
    bq, bk = block_dims(block_size)
    if torch.compiler.is_compiling():
        visible, partial = _geometry(sq, sk, bq, bk)
        if device is not None:
            visible, partial = visible.to(device), partial.to(device)
        return visible, partial
    # eager: cached per device, so a CUDA caller pays no host->device copy (a pageable copy
    # would stall the host on every attention call)
    dev = None if device is None else torch.device(device)
    if dev is not None and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _geometry_on(int(sq), int(sk), bq, bk, dev)


@functools.lru_cache(maxsize=128)
def _geometry_on(sq: int, sk: int, bq: int, bk: int, device: torch.device | None):
    visible, partial = _geometry(sq, sk, bq, bk)
    if device is not None:
        visible, partial = visible.to(device), partial.to(device)
    return visible, partial


def local_window(sq: int, sk: int, block_size, window: int, device=None) -> torch.Tensor:
    """Bool [NQB, NKB]: the ``window`` visible KV blocks nearest the causal frontier of each row
    (the partial blocks count towards the window)."""
    visible, _ = block_causal(sq, sk, block_size, device)
    bq, bk = block_dims(block_size)
    nqb, nkb = visible.shape
    p = sk - sq
    i = torch.arange(nqb, device=visible.device).unsqueeze(1)
    j = torch.arange(nkb, device=visible.device).unsqueeze(0)
    last_kv_block = (p + torch.clamp((i + 1) * bq, max=sq) - 1) // bk
    return visible & (j > last_kv_block - window)
