"""Engine-neutral pieces of the vLLM backend: the batch plan, the paged K/V gather, one request's
sparse pre-fill. Plain torch (no vLLM import), so they are unit-tested without an engine.

vLLM packs a step's tokens of every request one after the other: request ``r`` owns the query
tokens ``query_start_loc[r] : query_start_loc[r + 1]`` (Sq of them, the newest of its ``seq_len``
tokens: the first ``P = seq_len - Sq`` are the cached prefix, from earlier chunks or the prefix
cache) and the KV blocks ``block_table[r, :ceil(seq_len / page)]`` of the paged cache.

Paged cache, per layer, as the CPU backend stores it (one page = ``page`` tokens):

* ``key_cache``   [num_pages, Hkv, page, D] as a view; the memory of a (page, head) is
  token-major (``"rows"``: [page, D]), dim-major (``"cols"``: [D, page], what the CPU kernels
  use for K) or, for 16-bit caches on CPUs with AMX (vLLM's ``amx`` ISA), tiles of 16 tokens
  with the dims in pairs (``"amx"``: [page / 16, D / 2, 16, 2]). :func:`detect_layout` tells
  which by writing known values through the engine's own cache writer.
* ``value_cache`` [num_pages, Hkv, page, D], token-major ([page, D]); with ``"amx"`` tiles of 16
  dims with the tokens in pairs ([D / 16, page / 2, 16, 2]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ...policy import PrismPolicy
from ...scorers import Scorer

__all__ = [
    "BatchPlan",
    "LAYOUTS",
    "detect_layout",
    "gather_kv",
    "plan_batch",
    "sparse_prefill",
]

#: memory layouts of one (page, KV head) of the key cache that :func:`gather_kv` reads
LAYOUTS = ("rows", "cols", "amx")


@dataclass
class BatchPlan:
    """Which requests of a step run sparse. Per request (``num_reqs`` of them): ``starts`` /
    ``ends`` its query tokens in the packed batch, ``seq_lens`` its Sk (prefix + new tokens).

    ``sparse``: indices of the requests the sparse path takes (Sq >= ``min_query_len`` and
    Sk >= ``min_len``); ``dense``: the others (decode, short chunks), ``why`` the reason of each
    ("decode" or "short_query" or "short"). Lists of ints: the plan is made once per step on the
    host and shared by every layer."""

    starts: list[int]
    ends: list[int]
    seq_lens: list[int]
    sparse: list[int] = field(default_factory=list)
    dense: list[int] = field(default_factory=list)
    why: dict[int, str] = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)

    def query_len(self, r: int) -> int:
        return self.ends[r] - self.starts[r]

    def dense_token_index(self) -> torch.Tensor:
        """int64 [N]: the packed positions of the dense requests' query tokens, in order."""
        parts = [torch.arange(self.starts[r], self.ends[r]) for r in self.dense]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def plan_batch(
    query_start_loc: Sequence[int] | torch.Tensor,
    seq_lens: Sequence[int] | torch.Tensor,
    policy: PrismPolicy,
    device: torch.device | str = "cpu",
) -> BatchPlan:
    """Split a step's requests into sparse and dense (see :class:`BatchPlan`).

    ``query_start_loc``: ``num_reqs + 1`` offsets into the packed tokens; ``seq_lens``:
    ``num_reqs`` key counts (prefix included). ``device`` picks the policy's ``min_len``."""
    qsl = [
        int(x)
        for x in (query_start_loc.tolist() if torch.is_tensor(query_start_loc) else query_start_loc)
    ]
    sls = [int(x) for x in (seq_lens.tolist() if torch.is_tensor(seq_lens) else seq_lens)]
    if len(qsl) != len(sls) + 1:
        raise ValueError(f"query_start_loc has {len(qsl)} entries for {len(sls)} requests")
    plan = BatchPlan(starts=qsl[:-1], ends=qsl[1:], seq_lens=sls)
    min_len = policy.min_len_for(torch.device(device))
    for r, sk in enumerate(sls):
        sq = plan.query_len(r)
        if sq > sk:
            raise ValueError(f"request {r}: {sq} new tokens but only {sk} keys")
        if sq < 2:
            why = "decode"
        elif sq < policy.min_query_len:
            why = "short_query"
        elif sk < min_len:
            why = "short"
        else:
            plan.sparse.append(r)
            continue
        plan.dense.append(r)
        plan.why[r] = why
    return plan


def _pages_as(cache: torch.Tensor, idx: torch.Tensor, shape, strides) -> torch.Tensor:
    """The pages ``idx`` of a [num_pages, Hkv, page, D] cache view whose (page, head) memory is
    read as ``shape`` with element ``strides`` (a strided view; the page and head strides kept)."""
    full = cache.as_strided(
        (cache.shape[0], cache.shape[1], *shape),
        (cache.stride(0), cache.stride(1), *strides),
        cache.storage_offset(),
    )
    return full[idx]


def gather_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    pages: torch.Tensor,
    seq_len: int,
    key_layout: str = "cols",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's keys and values from the paged cache -> k, v [1, Hkv, Sk, D] (contiguous).

    ``key_cache`` / ``value_cache`` [num_pages, Hkv, page, D] (views as described in the module
    docstring); ``pages`` int [>= ceil(Sk / page)]: the request's row of the block table;
    ``seq_len`` = Sk. Copies O(Sk * D) per head: the cache itself is never expanded or
    densified, and nothing of size Sq x Sk is made."""
    if key_layout not in LAYOUTS:
        raise ValueError(f"key_layout must be one of {LAYOUTS}, got {key_layout!r}")
    num_pages, hkv, page, d = key_cache.shape
    n = -(-int(seq_len) // page)
    if n > pages.numel():
        raise ValueError(
            f"{seq_len} tokens need {n} pages, the block table row has {pages.numel()}"
        )
    idx = pages[:n].to(device=key_cache.device, dtype=torch.long)
    v = value_cache[idx].permute(1, 0, 2, 3)  # token-major: [Hkv, n, page, D] (views only)
    if key_layout == "cols":  # K of a (page, head) is [D, page]
        k = _pages_as(key_cache, idx, (d, page), (page, 1)).permute(1, 0, 3, 2)
    elif key_layout == "amx":
        if page % 16 or d % 16:
            raise ValueError(
                f"the amx layout needs page % 16 == 0 and D % 16 == 0, got page {page}, D {d}"
            )
        # K: [page / 16, D / 2, 16, 2] (16-token tiles, dims in pairs) -> [Hkv, n, page/16, 16, D/2, 2]
        k = _pages_as(key_cache, idx, (page // 16, d // 2, 16, 2), (16 * d, 32, 2, 1))
        k = k.permute(1, 0, 2, 4, 3, 5)
        # V: [D / 16, page / 2, 16, 2] (16-dim tiles, tokens in pairs) -> [Hkv, n, page/2, 2, D/16, 16]
        v = _pages_as(value_cache, idx, (d // 16, page // 2, 16, 2), (page * 16, 32, 2, 1))
        v = v.permute(1, 0, 3, 5, 2, 4)
    else:
        k = key_cache[idx].permute(1, 0, 2, 3)
    k = k.reshape(hkv, n * page, d)[:, :seq_len]
    v = v.reshape(hkv, n * page, -1)[:, :seq_len]
    return k.unsqueeze(0).contiguous(), v.unsqueeze(0).contiguous()


def detect_layout(
    write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None],
    hkv: int,
    page: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> str | None:
    """Which :data:`LAYOUTS` entry the engine's cache writer uses for K (None: neither).

    ``write(key, value, key_cache, value_cache, slot_mapping)`` is the engine's writer (key/value
    [N, Hkv, D], slots int64 [N] = page * page_size + offset); it runs once on a scratch cache of
    two pages and the result is read back with :func:`gather_kv` under each layout."""
    n = page + page // 2 + 1  # a full page and part of another, in a shuffled page order
    pages = torch.tensor([1, 0], dtype=torch.long)
    kv = torch.zeros(2, hkv, page, 2 * d, dtype=dtype, device=device)
    kc, vc = kv.view(2, hkv, 2 * page, d).chunk(2, dim=2)
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(n, hkv, d, generator=gen).to(dtype=dtype, device=device)
    value = torch.randn(n, hkv, d, generator=gen).to(dtype=dtype, device=device)
    pos = torch.arange(n)
    slots = pages[pos // page] * page + pos % page
    write(key, value, kc, vc, slots.to(device))
    want_k, want_v = key.permute(1, 0, 2).unsqueeze(0), value.permute(1, 0, 2).unsqueeze(0)
    for layout in LAYOUTS:
        if layout == "amx" and (page % 16 or d % 16):
            continue
        k, v = gather_kv(kc, vc, pages, n, layout)
        if torch.equal(k, want_k) and torch.equal(v, want_v):
            return layout
    return None


def sparse_prefill(
    scorer: Scorer,
    backend: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
):
    """One request's causal sparse pre-fill chunk: q [Sq, Hq, D] (vLLM's token-major layout),
    k/v [1, Hkv, Sk, D] (from :func:`gather_kv`, prefix included, Sk >= Sq) ->
    (out [Sq, Hq, D], selection, q as [1, Hq, Sq, D]).

    The scorer estimates on block summaries (never Sq x Sk); ``backend(q, k, v, block_mask,
    scale)`` is a Prism kernel backend."""
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, Sq, D]
    sel = scorer(qh, k)
    out = backend(qh, k, v, sel.block_mask(), scale=scale)
    return out[0].transpose(0, 1), sel, qh
