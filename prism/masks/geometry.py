"""Block-causal geometry of a (possibly cached-prefix) causal attention pattern.

Shape vocabulary: Sq queries, Sk keys (Sk >= Sq), P = Sk - Sq cached-prefix length, BS block size,
NQB = ceil(Sq / BS), NKB = ceil(Sk / BS). Query block i lives on the query-local grid and query t
sits at absolute position P + t.

* query block i may see KV block j  iff  j*BS <= P + min((i+1)*BS, Sq) - 1
* a visible block is *partial* (cut by the causal frontier) iff  j*BS + BS - 1 > P + i*BS
"""

from __future__ import annotations

import functools
import math

import torch

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)


def check_block_size(block_size: int) -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(
            f"unsupported block_size {block_size}; supported block sizes: {list(SUPPORTED_BLOCK_SIZES)}"
        )
    return block_size


def num_blocks(length: int, block_size: int) -> int:
    return math.ceil(length / block_size)


def _geometry(sq: int, sk: int, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    nqb, nkb = num_blocks(sq, bs), num_blocks(sk, bs)
    p = sk - sq
    i = torch.arange(nqb).unsqueeze(1)
    j = torch.arange(nkb).unsqueeze(0)
    last_q = (
        p + torch.clamp((i + 1) * bs, max=sq) - 1
    )  # absolute position of the block's last query
    visible = j * bs <= last_q
    partial = visible & (j * bs + bs - 1 > p + i * bs)
    return visible, partial


def block_causal(
    sq: int, sk: int, block_size: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(visible, partial)``, both bool ``[NQB, NKB]``.

    ``visible``: query block i may attend to some key of KV block j (block-causal).
    ``partial``: visible blocks the causal frontier cuts (the "diagonal" blocks); they need the
    token-level causal mask. Everything visible and not partial is a full block.
    """
    if sq > sk:
        raise ValueError(f"Sq ({sq}) must be <= Sk ({sk})")
    # the cache saves host work in eager mode; under torch.compile it only makes Dynamo warn
    if torch.compiler.is_compiling():
        visible, partial = _geometry(sq, sk, block_size)
        if device is not None:
            visible, partial = visible.to(device), partial.to(device)
        return visible, partial
    # eager: cached per device, so a CUDA caller pays no host->device copy (a pageable copy
    # would stall the host on every attention call)
    dev = None if device is None else torch.device(device)
    if dev is not None and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _geometry_on(int(sq), int(sk), int(block_size), dev)


@functools.lru_cache(maxsize=128)
def _geometry_on(sq: int, sk: int, bs: int, device: torch.device | None):
    visible, partial = _geometry(sq, sk, bs)
    if device is not None:
        visible, partial = visible.to(device), partial.to(device)
    return visible, partial


def local_window(sq: int, sk: int, block_size: int, window: int, device=None) -> torch.Tensor:
    """Bool [NQB, NKB]: the ``window`` visible KV blocks nearest the causal frontier of each row
    (the partial blocks count towards the window)."""
    visible, _ = block_causal(sq, sk, block_size, device)
    nqb, nkb = visible.shape
    p = sk - sq
    i = torch.arange(nqb, device=visible.device).unsqueeze(1)
    j = torch.arange(nkb, device=visible.device).unsqueeze(0)
    last_kv_block = (p + torch.clamp((i + 1) * block_size, max=sq) - 1) // block_size
    return visible & (j > last_kv_block - window)
