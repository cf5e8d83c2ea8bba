"""Zig-zag (head-tail) sequence sharding for causal context parallelism, in whole blocks.

A causal pre-fill of ``S`` tokens is split into ``2W`` chunks of whole ``BS``-token blocks
(``NB = ceil(S / BS)`` blocks; the first ``NB mod 2W`` chunks get one block more than the
others; only the last chunk can end in the ragged last block). Rank ``r`` of ``W`` holds
chunks ``r`` and ``2W - 1 - r``, concatenated in that order: a cheap early chunk and an
expensive late one, so every rank does about the same causal work.

Because both chunks start on a block boundary and only the last chunk (rank 0's second one) can
be ragged, the rank-local sequence has its own block grid: local block ``m`` of rank ``r`` is the
global block :meth:`ZigZagSharding.query_blocks` ``(r)[m]``.

``S`` must give at least ``2W`` blocks (every chunk non-empty); shorter sequences raise a
``ValueError`` (run them on one process: context parallelism only pays off on long inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..masks import check_block_size

__all__ = ["ZigZagSharding"]


def _check_pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class ZigZagSharding:
    """The zig-zag layout of a ``seq_len``-token sequence over ``world_size`` ranks.

    Args:
        seq_len: S, tokens in the whole sequence (any length >= 2W blocks; ragged allowed).
        block_size: BS, the sharding unit; must be the attention / scorer block size
            (16, 32, 64, 128 or 256).
        world_size: W, number of ranks.

    Token ranges are half-open ``(start, stop)`` on the absolute (global) positions.
    """

    seq_len: int
    block_size: int
    world_size: int
    _chunk_blocks: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_pos_int("seq_len", self.seq_len)
        check_block_size(self.block_size)
        _check_pos_int("world_size", self.world_size)
        nb, nc = self.num_blocks, 2 * self.world_size
        if nb < nc:
            raise ValueError(
                f"context parallelism over W={self.world_size} ranks needs at least 2W={nc} "
                f"blocks of {self.block_size} tokens, but S={self.seq_len} gives {nb}: use fewer "
                "ranks, a smaller block size, or run single-process"
            )
        base, extra = divmod(nb, nc)
        object.__setattr__(
            self, "_chunk_blocks", tuple(base + (1 if c < extra else 0) for c in range(nc))
        )

    # -- geometry -----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """NB = ceil(S / BS)."""
        return -(-self.seq_len // self.block_size)

    @property
    def num_chunks(self) -> int:
        """2W."""
        return 2 * self.world_size

    @property
    def chunk_blocks(self) -> tuple[int, ...]:
        """Blocks per chunk, 2W entries (they differ by at most one)."""
        return self._chunk_blocks

    def chunk_block_range(self, c: int) -> tuple[int, int]:
        """Global block range ``(first, stop)`` of chunk ``c``."""
        first = sum(self._chunk_blocks[:c])
        return first, first + self._chunk_blocks[c]

    def chunk_range(self, c: int) -> tuple[int, int]:
        """Token range ``(start, stop)`` of chunk ``c`` (stop clipped to S)."""
        first, stop = self.chunk_block_range(c)
        bs = self.block_size
        return first * bs, min(stop * bs, self.seq_len)

    def rank_chunks(self, rank: int) -> tuple[int, int]:
        """The two chunks of ``rank``: ``(rank, 2W - 1 - rank)``."""
        self._check_rank(rank)
        return rank, self.num_chunks - 1 - rank

    def rank_ranges(self, rank: int) -> list[tuple[int, int]]:
        """Token ranges of ``rank``'s two chunks, in local order."""
        return [self.chunk_range(c) for c in self.rank_chunks(rank)]

    def local_len(self, rank: int) -> int:
        """Tokens held by ``rank``."""
        return sum(stop - start for start, stop in self.rank_ranges(rank))

    @cached_property
    def max_local_len(self) -> int:
        """The longest rank-local sequence (collectives pad every shard to it)."""
        return max(self.local_len(r) for r in range(self.world_size))

    @cached_property
    def max_local_blocks(self) -> int:
        return -(-self.max_local_len // self.block_size)

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """int64 [Sl]: absolute positions of ``rank``'s local tokens."""
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.rank_ranges(rank)])

    def query_blocks(self, rank: int, device=None) -> torch.Tensor:
        """int64 [NBl]: the global block index of every local block of ``rank``."""
        return torch.cat(
            [
                torch.arange(*self.chunk_block_range(c), device=device)
                for c in self.rank_chunks(rank)
            ]
        )

    def local_blocks(self, rank: int) -> int:
        return sum(self._chunk_blocks[c] for c in self.rank_chunks(rank))

    @cached_property
    def block_owner(self) -> torch.Tensor:
        """int64 [NB]: the rank holding each global block."""
        owner = torch.empty(self.num_blocks, dtype=torch.long)
        for r in range(self.world_size):
            owner[self.query_blocks(r)] = r
        return owner

    @cached_property
    def block_local_index(self) -> torch.Tensor:
        """int64 [NB]: the index of each global block inside its owner's local block grid."""
        idx = torch.empty(self.num_blocks, dtype=torch.long)
        for r in range(self.world_size):
            qb = self.query_blocks(r)
            idx[qb] = torch.arange(qb.numel())
        return idx

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, {self.world_size}), got {rank!r}")

    # -- data movement (local, no communication) ----------------------------------------------
    def shard(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """``rank``'s shard of the full-sequence tensor ``x`` (length S along ``dim``, default 2
        as in ``[B, H, S, D]``): its two chunks concatenated, length :meth:`local_len`."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(
                f"x has length {x.shape[dim]} along dim {dim}, the sharding is for S={self.seq_len}"
            )
        return torch.cat([x.narrow(dim, a, b - a) for a, b in self.rank_ranges(rank)], dim=dim)

    def unshard(self, pieces, dim: int = 2) -> torch.Tensor:
        """Inverse of :meth:`shard`: ``pieces[r]`` is rank ``r``'s shard (exactly
        :meth:`local_len` long along ``dim``); returns the full-sequence tensor (length S)."""
        pieces = list(pieces)
        if len(pieces) != self.world_size:
            raise ValueError(f"need {self.world_size} pieces (one per rank), got {len(pieces)}")
        chunks: list[torch.Tensor | None] = [None] * self.num_chunks
        for r, p in enumerate(pieces):
            if p.shape[dim] != self.local_len(r):
                raise ValueError(
                    f"piece {r} has length {p.shape[dim]} along dim {dim}, rank {r} holds "
                    f"{self.local_len(r)} tokens"
                )
            off = 0
            for c in self.rank_chunks(r):
                a, b = self.chunk_range(c)
                chunks[c] = p.narrow(dim, off, b - a)
                off += b - a
        return torch.cat(chunks, dim=dim)

    def shard_blocks(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """:meth:`shard` on a block-level tensor (length NB along ``dim``, e.g. pooled means)."""
        if x.shape[dim] != self.num_blocks:
            raise ValueError(f"x has {x.shape[dim]} blocks along dim {dim}, need {self.num_blocks}")
        return x.index_select(dim, self.query_blocks(rank, device=x.device))

    def unshard_blocks(self, pieces, dim: int = 2) -> torch.Tensor:
        """Inverse of :meth:`shard_blocks`."""
        pieces = list(pieces)
        if len(pieces) != self.world_size:
            raise ValueError(f"need {self.world_size} pieces (one per rank), got {len(pieces)}")
        order = torch.cat([self.query_blocks(r) for r in range(self.world_size)])
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())
        cat = torch.cat(pieces, dim=dim)
        return cat.index_select(dim, inv.to(cat.device))
