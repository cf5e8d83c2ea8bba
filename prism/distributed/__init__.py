"""Context parallelism: long causal pre-fill split over ranks with torch.distributed (issue 13).

* :class:`ZigZagSharding`: the load-balanced (head-tail) layout of a sequence over ``W`` ranks in
  whole blocks, with ``shard`` / ``unshard`` (no communication);
* :func:`context_parallel_attention`: each rank scores its query blocks (the rows of the
  single-process selection), then attends only the selected KV blocks, fetching remote ones
  (or passing K/V around a ring) and merging partials by log-sum-exp; returns ``(out, CPStats)``
  with the bytes every rank sent and received;
* :func:`block_attention_lse` / :func:`merge_partials`: the per-piece attention with explicit
  positions and the log-sum-exp merge.

Launch under ``torchrun`` (NCCL on GPUs) or with gloo on CPUs; see
``benchmarks/bench_context_parallel.py``.
"""

from .comm import CountingComm, Traffic
from .context_parallel import (
    KV_MODES,
    SCORE_MODES,
    ContextParallelAttention,
    CPStats,
    context_parallel_attention,
    gather_sequence,
    resolve_score_mode,
    scorer_is_row_local,
)
from .local_attention import INVALID_POS, block_attention_lse, merge_partials
from .sharding import ZigZagSharding

__all__ = [
    "INVALID_POS",
    "KV_MODES",
    "SCORE_MODES",
    "CPStats",
    "ContextParallelAttention",
    "CountingComm",
    "Traffic",
    "ZigZagSharding",
    "block_attention_lse",
    "context_parallel_attention",
    "gather_sequence",
    "merge_partials",
    "resolve_score_mode",
    "scorer_is_row_local",
]
