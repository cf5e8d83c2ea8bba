"""Context-parallel sparse attention (prism.distributed, issue 13) on CPU with gloo.

The distributed cases run once per world size (2 and 3 ranks) in spawned processes on
127.0.0.1, every case inside the same process group; a rank that dies fails the test, and its
peers' collectives time out (gloo, 120 s) instead of hanging. The ranks only run the op and save what they
got; this (pytest) process then builds the same inputs, the single-process selection
(``scorer(q, k)`` on the whole sequence) and the single-process output
(``reference_attention`` with that selection, float32), and compares: selections identical,
outputs to 1e-5, every rank's byte counts consistent with the others'.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from datetime import timedelta

import pytest
import torch

import prism
from prism.distributed import (
    INVALID_POS,
    ContextParallelAttention,
    ZigZagSharding,
    block_attention_lse,
    context_parallel_attention,
    merge_partials,
    resolve_score_mode,
)
from prism.kernels.reference import reference_attention

TOL = 1e-5

# name -> case. scorer: build_scorer mapping; S, BS; shape (B, Hq, Hkv, D); kv / score modes.
# "S": None means "the shortest allowed" (2W blocks, ragged last block), set per world size.
NODIAG = {"scorer": "meanpool", "threshold": 0.3, "force_diagonal": False, "force_sink": False}
CASES = {
    "meanpool_fetch": dict(scorer={"scorer": "meanpool", "threshold": 0.6}, S=1000, BS=32,
                           shape=(2, 4, 2, 16), kv="fetch", score="auto"),
    "meanpool_rows_ring": dict(scorer={"scorer": "meanpool", "threshold": 0.6}, S=1000, BS=32,
                               shape=(2, 4, 2, 16), kv="ring", score="rows"),
    "meanpool_gather_allgather": dict(scorer={"scorer": "meanpool", "threshold": 0.6}, S=1000,
                                      BS=32, shape=(2, 4, 2, 16), kv="allgather", score="gather"),
    "prism_summaries_fetch_4097": dict(scorer={"scorer": "prism", "threshold": 0.4, "impl": "torch"},
                                       S=4097, BS=32, shape=(2, 4, 1, 32), kv="fetch", score="auto"),
    "prism_gather_ring_bs16": dict(scorer={"scorer": "prism", "threshold": 0.4, "impl": "torch"},
                                   S=1000, BS=16, shape=(2, 4, 2, 16), kv="ring", score="gather"),
    "prism_nocal_rows_allgather": dict(
        scorer={"scorer": "prism", "threshold": 0.5, "calibrate": False, "impl": "torch"},
        S=1000, BS=32, shape=(2, 4, 2, 16), kv="allgather", score="rows"),
    "probe_rows_fetch": dict(scorer={"scorer": "probe", "threshold": 0.5, "impl": "torch",
                                     "placement": "ends"},
                             S=1000, BS=32, shape=(2, 4, 2, 16), kv="fetch", score="auto"),
    # the default (shared) placement is not row-local: auto gathers
    "probe_shared_gather_fetch": dict(scorer={"scorer": "probe", "threshold": 0.5, "impl": "torch"},
                                      S=1000, BS=32, shape=(2, 4, 2, 16), kv="fetch", score="auto"),
    "xattn_rows_fetch_4097": dict(scorer={"scorer": "xattn", "threshold": 0.5}, S=4097, BS=32,
                                  shape=(2, 2, 1, 16), kv="fetch", score="auto"),
    "flexprefill_gather_fetch": dict(
        scorer={"scorer": "flexprefill", "threshold": 0.6, "tau": 0.125, "min_budget": 0},
        S=1000, BS=32, shape=(2, 4, 2, 16), kv="fetch", score="auto"),
    "minference_gather_ring": dict(
        scorer={"scorer": "minference", "vertical": 32, "slash": 64, "forced_vertical": 4,
                "forced_slash": 8, "probe": 16},
        S=1000, BS=16, shape=(2, 4, 2, 16), kv="ring", score="auto"),
    "union_gather_fetch": dict(
        scorer={"scorer": "union", "policies": [{"scorer": "prism", "threshold": 0.4,
                                                 "impl": "torch"},
                                                {"scorer": "window", "window": 2}]},
        S=1000, BS=32, shape=(2, 4, 2, 16), kv="fetch", score="auto"),
    "dense_ring_4097": dict(scorer={"scorer": "dense"}, S=4097, BS=32, shape=(1, 2, 1, 16),
                            kv="ring", score="auto"),
    # no forced blocks + a low threshold: some K/V units are selected by nobody; their V is NaN
    "nodiag_poisoned_fetch": dict(scorer=NODIAG, S=1000, BS=32, shape=(2, 4, 2, 16), kv="fetch",
                                  score="auto", poison=True),
    "nodiag_poisoned_ring": dict(scorer=NODIAG, S=1000, BS=32, shape=(2, 4, 2, 16), kv="ring",
                                 score="auto", poison=True),
    "nodiag_poisoned_allgather": dict(scorer=NODIAG, S=1000, BS=32, shape=(2, 4, 2, 16),
                                      kv="allgather", score="auto", poison=True),
    "window_fetch": dict(scorer={"scorer": "window", "window": 2}, S=1000, BS=32,
                         shape=(2, 4, 2, 16), kv="fetch", score="auto"),
    "meanpool_shortest_fetch": dict(scorer={"scorer": "meanpool", "threshold": 0.5}, S=None,
                                    BS=16, shape=(2, 2, 1, 16), kv="fetch", score="auto"),
}  # fmt: skip


def _seq_len(case, world_size):
    return case["S"] if case["S"] is not None else 2 * world_size * case["BS"] - 5


def _inputs(name, case, world_size):
    """Deterministic full-sequence q, k, v (the same in every process)."""
    b, hq, hkv, d = case["shape"]
    s = _seq_len(case, world_size)
    gen = torch.Generator().manual_seed(sum(map(ord, name)) + 17 * world_size)
    q = torch.randn(b, hq, s, d, generator=gen)
    k = torch.randn(b, hkv, s, d, generator=gen)
    v = torch.randn(b, hkv, s, d, generator=gen)
    # some structure, so that the scorers have something to select: a few "heavy" key blocks
    heavy = torch.randint(0, s, (b, hkv, 6), generator=gen)
    k.scatter_add_(2, heavy[..., None].expand(-1, -1, -1, d), 3.0 * q[:, :: hq // hkv, :6])
    return q, k, v


def _poisoned_v(case, sel_mask, v, hkv):
    """V with NaN in every (batch, KV head, block) unit that no query head of the group and no
    query block selects; returns (poisoned V, number of poisoned units)."""
    b, hq, nqb, nkb = sel_mask.shape
    bs = case["BS"]
    used = sel_mask.view(b, hkv, hq // hkv, nqb, nkb).any(dim=3).any(dim=2)  # [B, Hkv, NKB]
    tok = used.repeat_interleave(bs, dim=-1)[..., : v.shape[2]]
    return v.masked_fill(~tok[..., None], float("nan")), int((~used).sum())


def _worker(rank, world_size, port, outdir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    results = {}
    for name, case in CASES.items():
        q, k, v = _inputs(name, case, world_size)
        plan = ZigZagSharding(q.shape[2], case["BS"], world_size)
        scorer = prism.build_scorer(case["scorer"], block_size=case["BS"])
        if case.get("poison"):
            sel = scorer(q, k)
            v, _ = _poisoned_v(case, sel.mask, v, k.shape[1])
        out, stats = context_parallel_attention(
            plan.shard(q, rank),
            plan.shard(k, rank),
            plan.shard(v, rank),
            plan,
            scorer,
            kv_mode=case["kv"],
            score_mode=case["score"],
            impl="torch",
        )
        results[name] = dict(
            out=out,
            selection=stats.selection,
            query_blocks=stats.query_blocks,
            score_mode=stats.score_mode,
            bytes_sent=stats.bytes_sent,
            bytes_recv=stats.bytes_recv,
            traffic=stats.traffic,
            kv_units_moved=stats.kv_units_moved,
            kv_units_remote=stats.kv_units_remote,
            ring_steps_skipped=stats.ring_steps_skipped,
        )
    # bad input, caught before any collective (so no rank blocks)
    errors = {}
    q, k, v = _inputs("err", CASES["meanpool_fetch"], world_size)
    plan = ZigZagSharding(q.shape[2], 32, world_size)
    local = [plan.shard(x, rank) for x in (q, k, v)]
    bad = {
        "plan_world_size": lambda: context_parallel_attention(
            *local, ZigZagSharding(q.shape[2], 32, world_size + 1), "meanpool", block_size=32
        ),
        "block_size": lambda: context_parallel_attention(*local, plan, "meanpool", block_size=16),
        "local_len": lambda: context_parallel_attention(
            local[0][:, :, 1:], *local[1:], plan, "meanpool", block_size=32
        ),
        "rows_not_row_local": lambda: context_parallel_attention(
            *local, plan, "flexprefill", block_size=32, score_mode="rows"
        ),
        "local_needs_data": lambda: context_parallel_attention(
            *local, plan, "meanpool", block_size=32, score_mode="local"
        ),
        "kv_mode": lambda: context_parallel_attention(
            *local, plan, "meanpool", block_size=32, kv_mode="nccl-magic"
        ),
    }
    for key, fn in bad.items():
        try:
            fn()
            errors[key] = "no error"
        except (ValueError, TypeError) as e:
            errors[key] = f"{type(e).__name__}: {e}"
    results["_errors"] = errors
    # the nn.Module form gives the functional result
    mod = ContextParallelAttention("meanpool", block_size=32, threshold=0.6, kv_mode="ring")
    out_mod = mod(*local, plan)
    out_fn, _ = context_parallel_attention(
        *local, plan, "meanpool", block_size=32, threshold=0.6, kv_mode="ring"
    )
    results["_module"] = dict(equal=torch.equal(out_mod, out_fn), stats=mod.last_stats is not None)
    dist.barrier()
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESULTS: dict[int, list[dict]] = {}


def _run(world_size: int) -> list[dict]:
    """Spawn ``world_size`` gloo ranks once (cached) and return their saved results."""
    if world_size in _RESULTS:
        return _RESULTS[world_size]
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, _free_port(), outdir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        # no wall-clock limit here: a rank that dies raises from join(), and a rank left waiting
        # on a dead peer fails its collective after the process group's timeout (120 s)
        try:
            while not ctx.join():
                pass
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
        _RESULTS[world_size] = [
            torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
    return _RESULTS[world_size]


_REFERENCE: dict = {}


def _reference(name, world_size):
    """Single-process selection and output (float32 oracle) of a case."""
    key = (name, world_size)
    if key not in _REFERENCE:
        case = CASES[name]
        q, k, v = _inputs(name, case, world_size)
        sel = prism.build_scorer(case["scorer"], block_size=case["BS"])(q, k)
        out = reference_attention(q, k, v, sel.block_mask())  # clean V: poisoned units unused
        _REFERENCE[key] = (sel, out, (q, k, v))
    return _REFERENCE[key]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_cp_matches_single_process(world_size, name):
    results = _run(world_size)
    case = CASES[name]
    sel, ref, (q, k, v) = _reference(name, world_size)
    plan = ZigZagSharding(q.shape[2], case["BS"], world_size)
    per_rank = [r[name] for r in results]
    for rank, res in enumerate(per_rank):
        qb = plan.query_blocks(rank)
        assert torch.equal(res["query_blocks"], qb)
        want = sel.mask[:, :, qb]
        assert res["selection"].shape == want.shape
        assert torch.equal(res["selection"], want), f"rank {rank}: selection rows differ"
        assert torch.isfinite(res["out"]).all(), f"rank {rank}: non-finite output"
        assert res["score_mode"] == resolve_score_mode(
            prism.build_scorer(case["scorer"], block_size=case["BS"]), case["score"]
        )
    out = plan.unshard([res["out"] for res in per_rank])
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("world_size", [2, 3])
def test_cp_traffic(world_size):
    """Bytes: sent == received over all ranks per phase; the dense transports move every remote
    K/V unit; ``fetch`` moves exactly the selected remote units (+ the index exchange), fewer
    than all of them on sparse cases."""
    results = _run(world_size)
    for name, case in CASES.items():
        per_rank = [r[name] for r in results]
        b, hq, hkv, d = case["shape"]
        bs = case["BS"]
        plan = ZigZagSharding(_seq_len(case, world_size), bs, world_size)
        phases = set().union(*(res["traffic"]["by_phase"] for res in per_rank))
        for ph in phases:
            sent = sum(res["traffic"]["by_phase"].get(ph, {"sent": 0})["sent"] for res in per_rank)
            recv = sum(res["traffic"]["by_phase"].get(ph, {"recv": 0})["recv"] for res in per_rank)
            assert sent == recv, (name, ph)
        if per_rank[0]["score_mode"] == "local":  # dense / window: scoring moves nothing
            assert "score" not in phases, name
        unit = bs * 2 * d * 4  # one K + V block, float32
        kv_recv = [res["traffic"]["by_phase"].get("kv", {"recv": 0})["recv"] for res in per_rank]
        for rank, res in enumerate(per_rank):
            remote = b * hkv * (plan.num_blocks - plan.local_blocks(rank))
            assert res["kv_units_remote"] == remote
            if case["kv"] == "fetch":
                sel = _reference(name, world_size)[0].mask
                qb = plan.query_blocks(rank)
                need = sel[:, :, qb].view(b, hkv, hq // hkv, qb.numel(), -1).any(3).any(2)
                need[..., qb] = False
                assert res["kv_units_moved"] == int(need.sum()), (name, rank)
            elif case["kv"] == "ring":
                assert kv_recv[rank] == (world_size - 1) * b * hkv * plan.max_local_len * 2 * d * 4
            else:  # allgather: V here; K too unless the scoring phase gathered it
                n_kv = 1 if res["score_mode"] in ("rows", "gather") else 2
                want = n_kv * (world_size - 1) * b * hkv * plan.max_local_len * d * 4
                assert kv_recv[rank] == want, (name, rank)
        if case["kv"] == "fetch":
            # over all ranks: payload + one int64 request per unit + the counts exchange
            moved = sum(res["kv_units_moved"] for res in per_rank)
            assert sum(kv_recv) == moved * (unit + 8) + 8 * world_size * (world_size - 1), name
        if case["kv"] == "fetch" and case["scorer"]["scorer"] in ("window", "meanpool"):
            assert sum(r["kv_units_moved"] for r in per_rank) < sum(
                r["kv_units_remote"] for r in per_rank
            ), f"{name}: sparse fetch should move fewer units than a dense transport"


def test_cp_poisoned_units_exist():
    """The poisoned cases really poison something (otherwise they would test nothing)."""
    for name in ("nodiag_poisoned_fetch", "nodiag_poisoned_ring", "nodiag_poisoned_allgather"):
        case = CASES[name]
        sel, _, (_, k, v) = _reference(name, 2)
        _, n = _poisoned_v(case, sel.mask, v, k.shape[1])
        assert n > 0


@pytest.mark.parametrize("world_size", [2, 3])
def test_cp_bad_input_raises(world_size):
    errors = _run(world_size)[0]["_errors"]
    for key, msg in errors.items():
        assert msg.startswith(("ValueError", "TypeError")), (key, msg)
    assert "W=" in errors["plan_world_size"]
    assert "block_size" in errors["block_size"]
    assert "Sq must equal Sk" in errors["local_len"] or "holds" in errors["local_len"]
    assert "row-local" in errors["rows_not_row_local"]
    assert "valid" in errors["kv_mode"]
    assert "data-independent" in errors["local_needs_data"]


def test_cp_module_matches_function():
    res = _run(2)[0]["_module"]
    assert res["equal"] and res["stats"]


# -- no process group needed ------------------------------------------------------------------
@pytest.mark.parametrize(
    "s,bs,w", [(1000, 32, 2), (4097, 32, 3), (64, 16, 2), (4096, 128, 4), (2 * 4 * 16 - 5, 16, 4)]
)
def test_sharding_roundtrip_and_layout(s, bs, w):
    plan = ZigZagSharding(s, bs, w)
    x = torch.randn(2, 3, s, 5)
    pieces = [plan.shard(x, r) for r in range(w)]
    assert [p.shape[2] for p in pieces] == [plan.local_len(r) for r in range(w)]
    assert torch.equal(plan.unshard(pieces), x)
    # chunks: whole blocks, contiguous, covering [0, S), sizes within one block of each other
    ranges = [plan.chunk_range(c) for c in range(2 * w)]
    assert ranges[0][0] == 0 and ranges[-1][1] == s
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(a % bs == 0 for a, _ in ranges)
    assert max(plan.chunk_blocks) - min(plan.chunk_blocks) <= 1 and min(plan.chunk_blocks) >= 1
    # zig-zag: rank r holds chunks r and 2W-1-r, positions in local order
    for r in range(w):
        a, b = ranges[r], ranges[2 * w - 1 - r]
        want = torch.cat([torch.arange(*a), torch.arange(*b)])
        assert torch.equal(plan.positions(r), want)
        assert torch.equal(plan.query_blocks(r), torch.unique(want // bs))
        assert torch.equal(pieces[r][0, 0, :, 0], x[0, 0, want, 0])
    # every block has exactly one owner; block-level shard / unshard round trip
    owners = torch.cat([plan.query_blocks(r) for r in range(w)])
    assert torch.equal(owners.sort().values, torch.arange(plan.num_blocks))
    for r in range(w):
        assert (plan.block_owner[plan.query_blocks(r)] == r).all()
        assert torch.equal(
            plan.block_local_index[plan.query_blocks(r)], torch.arange(plan.local_blocks(r))
        )
    xb = torch.randn(2, 3, plan.num_blocks, 4)
    assert torch.equal(plan.unshard_blocks([plan.shard_blocks(xb, r) for r in range(w)]), xb)
    # balance: causal work (visible query-key pairs) per rank within one chunk's worth
    work = [sum((p + 1) for p in plan.positions(r).tolist()) for r in range(w)]
    chunk = plan.chunk_blocks[0] * bs
    assert max(work) - min(work) <= 2 * chunk * s


def test_sharding_errors():
    with pytest.raises(ValueError, match="at least 2W=8 blocks"):
        ZigZagSharding(2 * 4 * 16 - 17, 16, 4)  # 7 blocks for 8 chunks
    with pytest.raises(ValueError, match="unsupported block_size"):
        ZigZagSharding(1000, 48, 2)
    with pytest.raises(TypeError):
        ZigZagSharding(1000.0, 32, 2)
    with pytest.raises(ValueError):
        ZigZagSharding(1000, 32, 0)
    plan = ZigZagSharding(1000, 32, 2)
    with pytest.raises(ValueError, match="rank"):
        plan.rank_ranges(2)
    with pytest.raises(ValueError, match="S=1000"):
        plan.shard(torch.zeros(1, 1, 999, 2), 0)
    with pytest.raises(ValueError, match="holds"):
        plan.unshard([torch.zeros(1, 1, 10, 2), torch.zeros(1, 1, 500, 2)])


def test_context_parallel_needs_process_group():
    plan = ZigZagSharding(256, 32, 2)
    q = torch.randn(1, 2, plan.local_len(0), 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_attention(q, q, q, plan, "meanpool", block_size=32)


def _positions_oracle(q, q_pos, k, v, kv_pos, sel, bs):
    """Plain dense float64 masked softmax with explicit positions (independent of the op)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    qb = torch.arange(sq) // bs
    kb = torch.arange(sk) // bs
    allowed = sel[:, :, qb][..., kb] & (kv_pos[None, :] <= q_pos[:, None])
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    s = (q.double() @ kk.transpose(-1, -2)) / math.sqrt(d)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    p = p.masked_fill(~allowed, 0)
    vv = vv.masked_fill(~allowed.any(2)[..., None], 0)  # keys nobody sees (may be NaN)
    return (p @ vv).float(), lse.float()


@pytest.mark.parametrize("sq,sk,bs,g", [(200, 333, 16, 2), (96, 130, 32, 1), (64, 64, 32, 4)])
def test_block_attention_lse_positions(sq, sk, bs, g):
    """Scattered query / key positions, ragged lengths, GQA, empty rows, NaN in unselected
    blocks; and the log-sum-exp merge of a key split equals the whole."""
    gen = torch.Generator().manual_seed(sq + sk)
    b, hkv, d = 2, 2, 16
    hq = hkv * g
    q = torch.randn(b, hq, sq, d, generator=gen)
    k = torch.randn(b, hkv, sk, d, generator=gen)
    v = torch.randn(b, hkv, sk, d, generator=gen)
    q_pos = torch.randperm(sq + sk, generator=gen)[:sq].sort().values
    kv_pos = torch.randperm(sq + sk, generator=gen)[:sk]
    kv_pos[-3:] = INVALID_POS  # padding keys
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    sel = torch.rand(b, hq, nqb, nkb, generator=gen) < 0.4
    sel[:, :, 0] = False  # a query block that sees nothing
    sel[..., 1::3] = False  # KV blocks nobody selects (poisoned below)
    unused = ~sel.view(b, hkv, g, nqb, nkb).any(3).any(2)  # [B, Hkv, NKB]
    tok = unused.repeat_interleave(bs, -1)[..., :sk, None]
    k_bad, v_bad = k.masked_fill(tok, float("nan")), v.masked_fill(tok, float("nan"))
    assert unused.any()
    out, lse = block_attention_lse(q, q_pos, k_bad, v_bad, kv_pos, sel, bs, impl="torch")
    ref_out, ref_lse = _positions_oracle(q, q_pos, k, v, kv_pos, sel, bs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, atol=TOL, rtol=TOL)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=TOL, rtol=TOL)
    assert (out[:, :, :bs] == 0).all() and torch.isinf(lse[:, :, :bs]).all()
    # split the keys at a block boundary and merge
    cut = bs * (nkb // 2)
    a = block_attention_lse(q, q_pos, k[:, :, :cut], v[:, :, :cut], kv_pos[:cut],
                            sel[..., : nkb // 2], bs, impl="torch")  # fmt: skip
    c = block_attention_lse(q, q_pos, k[:, :, cut:], v[:, :, cut:], kv_pos[cut:],
                            sel[..., nkb // 2 :], bs, impl="torch")  # fmt: skip
    m_out, m_lse = merge_partials(*a, *c)
    torch.testing.assert_close(m_out, ref_out, atol=TOL, rtol=TOL)
    torch.testing.assert_close(m_lse[fin], ref_lse[fin], atol=TOL, rtol=TOL)
    assert torch.isinf(m_lse[~fin]).all() and (m_out[~fin] == 0).all()


def test_block_attention_lse_matches_reference_attention():
    """On a plain causal square the op with arange positions is prism's oracle."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 1000, 16, generator=gen)
    k = torch.randn(2, 2, 1000, 16, generator=gen)
    v = torch.randn(2, 2, 1000, 16, generator=gen)
    sel = prism.build_scorer("meanpool", block_size=32, threshold=0.7)(q, k)
    ref, ref_lse = reference_attention(q, k, v, sel.block_mask(), return_lse=True)
    pos = torch.arange(1000)
    out, lse = block_attention_lse(q, pos, k, v, pos, sel.mask, 32, impl="torch")
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(lse, ref_lse, atol=TOL, rtol=TOL)


def test_block_attention_lse_bad_input():
    q = torch.randn(1, 3, 64, 16)
    k = torch.randn(1, 2, 64, 16)
    pos = torch.arange(64)
    with pytest.raises(ValueError, match="GQA"):
        block_attention_lse(q, pos, k, k, pos, torch.ones(1, 3, 2, 2, dtype=torch.bool), 32)
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="sel must be"):
        block_attention_lse(q, pos, k, k, pos, torch.ones(1, 2, 3, 2, dtype=torch.bool), 32)
    with pytest.raises(ValueError, match="impl"):
        block_attention_lse(q, pos, k, k, pos, torch.ones(1, 2, 2, 2, dtype=torch.bool), 32,
                            impl="cuda")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_flex_lse_path_matches_torch_path(dtype):
    """The CUDA per-piece op (compiled FlexAttention returning the LSE) against the torch path,
    on zig-zag-like positions: two query chunks, keys of another shard plus padding keys."""
    gen = torch.Generator().manual_seed(5)
    bs = 128
    q = torch.randn(2, 8, 1000, 64, generator=gen)
    k = torch.randn(2, 2, 1300, 64, generator=gen)
    v = torch.randn(2, 2, 1300, 64, generator=gen)
    q_pos = torch.cat([torch.arange(384, 768), torch.arange(2000, 2616)])
    kv_pos = torch.cat([torch.arange(0, 640), torch.arange(1900, 2500)])
    kv_pos = torch.cat([kv_pos, torch.full((60,), INVALID_POS)])
    sel = torch.rand(2, 8, 8, 11, generator=gen) < 0.6
    want, want_lse = block_attention_lse(q, q_pos, k, v, kv_pos, sel, bs, impl="torch")
    cuda = [t.cuda().to(dtype) for t in (q, k, v)]
    out, lse = block_attention_lse(
        cuda[0], q_pos.cuda(), cuda[1], cuda[2], kv_pos.cuda(), sel.cuda(), bs, impl="flex"
    )
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(out.float().cpu()[fin], want[fin], atol=tol, rtol=tol)
    torch.testing.assert_close(lse.float().cpu()[fin], want_lse[fin], atol=tol, rtol=tol)
    assert torch.isinf(lse.cpu()[~fin]).all()


def test_shared_probe_placement_is_not_row_local():
    """Block i's first ``shared`` probe is block i − 1's last row, which a chunk scored against
    its key prefix does not hold: ``auto`` must gather, ``rows`` must refuse."""
    from prism.distributed.context_parallel import resolve_score_mode, scorer_is_row_local

    shared = prism.build_scorer("probe", placement="shared", probes=2)
    assert not scorer_is_row_local(shared)
    assert scorer_is_row_local(prism.build_scorer("probe", placement="shared", probes=1))
    assert scorer_is_row_local(prism.build_scorer("probe", placement="ends", probes=2))
    assert resolve_score_mode(shared, "auto") == "gather"
    with pytest.raises(ValueError, match="row-local"):
        resolve_score_mode(shared, "rows")
