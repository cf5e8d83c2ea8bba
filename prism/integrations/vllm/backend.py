"""The Prism attention backend for vLLM V1 (CPU platform): sparse pre-fill, vLLM's dense rest.

Per attention call (one layer, one engine step; query [T, Hq, D] packed over the step's
requests, the step's K/V already written to the paged cache by vLLM's own writer):

* requests whose chunk is a pre-fill long enough for the policy (Sq >= ``min_query_len``,
  Sk >= ``min_len``, :func:`~.paged.plan_batch`) run Prism: the request's K/V (prefix
  included) are gathered from the paged cache, the layer's scorer selects blocks on block
  summaries and the policy's kernel attends over them (:func:`~.paged.sparse_prefill`);
* everything else (decode, short chunks, dense layers) runs vLLM's CPU kernel, on the sub-batch
  of those requests (its scheduler metadata is built once per step, by the metadata builder).

The backend is vLLM's CPU backend in everything else (KV-cache layout, page sizes, the cache
writer), so a model served with it keeps vLLM's memory layout and prefix caching.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from ...kernels import get_backend
from .paged import BatchPlan, detect_layout, gather_kv, plan_batch, sparse_prefill
from .policy import get_policy

# under vLLM's logger tree, so that the messages show in vLLM's log (server and engine processes)
logger = init_logger("vllm.prism")
_ANNOUNCED: set[int] = set()

#: the backend's member of vLLM's ``AttentionBackendEnum`` (``--attention-backend CUSTOM``; see
#: :mod:`.plugin` for why not a member of its own)
BACKEND_NAME = "CUSTOM"

__all__ = [
    "BACKEND_NAME",
    "PrismAttentionBackend",
    "PrismAttentionImpl",
    "PrismAttentionMetadata",
    "PrismMetadataBuilder",
]


@dataclass
class PrismAttentionMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata of the whole step, plus ``plan`` (which requests run sparse) and
    ``dense_part``: CPU metadata of the sub-batch of dense requests (their query tokens packed
    in request order), built only when a step mixes sparse and dense requests."""

    plan: BatchPlan | None = None
    dense_part: CPUAttentionMetadata | None = None
    dense_tokens: torch.Tensor | None = None


class PrismMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata builder, plus the step's :class:`~.paged.BatchPlan`."""

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> PrismAttentionMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        md = PrismAttentionMetadata(**fields)
        if not base.causal or self.is_cross_attention or self.is_encoder_only_attention:
            return md  # not a causal decoder: everything dense (vLLM's kernel)
        cm = common_attn_metadata
        qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1]
        seq_lens = base.seq_lens[: cm.num_reqs].cpu()
        md.plan = plan = plan_batch(qsl, seq_lens, get_policy(), device=self.device)
        if plan.sparse and plan.dense:
            md.dense_part, md.dense_tokens = self._dense_part(base, plan)
        return md

    def _dense_part(
        self, base: CPUAttentionMetadata, plan: BatchPlan
    ) -> tuple[CPUAttentionMetadata, torch.Tensor]:
        rows = torch.tensor(plan.dense, dtype=torch.long)
        lens = torch.tensor([plan.query_len(r) for r in plan.dense])
        qsl = torch.zeros(len(plan.dense) + 1, dtype=base.query_start_loc.dtype)
        qsl[1:] = torch.cumsum(lens, 0)
        seq_lens = base.seq_lens[rows]
        causal = base.causal
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(plan.dense),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            seq_lens=seq_lens,
            dtype=self.dtype,
            query_start_loc=qsl,
            causal=causal,
            sliding_window_size=self.window_size,
            isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        tokens = plan.dense_token_index()
        part = CPUAttentionMetadata(
            num_actual_tokens=int(tokens.numel()),
            max_query_len=int(lens.max()),
            query_start_loc=qsl,
            max_seq_len=int(seq_lens.max()),
            seq_lens=seq_lens,
            block_table=base.block_table[rows],
            slot_mapping=base.slot_mapping[tokens],
            scheduler_metadata=sched,
            causal=causal,
        )
        return part, tokens


_LAYER_RE = re.compile(r"\.(\d+)\.")


def _layer_index(layer) -> int | None:
    """``model.layers.7.self_attn.attn`` -> 7 (None if the name has no index)."""
    m = _LAYER_RE.search("." + str(getattr(layer, "layer_name", "")) + ".")
    return int(m.group(1)) if m else None


class PrismAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, with the long pre-fill chunks of each step run by Prism."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._key_layout: str | None = None
        self._unsupported: str | None = None
        if self.alibi_slopes is not None:
            self._unsupported = "ALiBi"
        elif self.sliding_window not in (-1, None):
            self._unsupported = "a sliding window"
        elif self.logits_soft_cap:
            self._unsupported = "logit soft-capping"
        elif self.sinks is not None:
            self._unsupported = "attention sinks"
        elif self.is_fp8_kv_cache:
            self._unsupported = "an fp8 KV cache"
        elif self.attn_type != AttentionType.DECODER:
            self._unsupported = f"attention type {self.attn_type}"
        if self._unsupported:
            logger.warning("Prism vLLM backend: %s runs dense (vLLM's kernel)", self._unsupported)

    # -- the paged key layout of this layer's cache writer ----------------------------------
    def _layout(self, layer, kv_cache: torch.Tensor) -> str:
        if self._key_layout is None:
            isa = layer.isa  # set on the layer by the metadata builder

            def write(key, value, kc, vc, slots):
                ops.cpu_attn_reshape_and_cache(
                    key, value, kc, vc, slots, isa,
                    k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
                )  # fmt: skip

            _, hkv, page, two_d = kv_cache.shape
            layout = detect_layout(write, hkv, page, two_d // 2, kv_cache.dtype, kv_cache.device)
            if layout is None:
                raise NotImplementedError(
                    f"Prism vLLM backend: the CPU key-cache layout of ISA {isa!r} is not one "
                    "Prism can read (token-major, dim-major or AMX-tiled pages); use another backend"
                )
            self._key_layout = layout
        return self._key_layout

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: PrismAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D], kv_cache [pages, Hkv, page, 2 D],
        output [T, Hq, D] (written in place and returned)."""
        md = attn_metadata
        plan = None if md is None else md.plan
        if plan is None or not plan.sparse or self._unsupported:
            self._record_dense(layer, plan)
            return super().forward(
                layer, query, key, value, kv_cache, md, output, output_scale, output_block_scale
            )
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("Prism vLLM backend: fused output quantization")
        policy = get_policy()
        idx = _layer_index(layer)
        scorer = policy.scorer_for(idx)
        if scorer is None:  # a dense layer of the policy
            self._record_dense(layer, plan, "dense_layer")
            return super().forward(layer, query, key, value, kv_cache, md, output)

        # the dense requests of a mixed step: vLLM's kernel on their sub-batch
        if md.dense_part is not None:
            tok = md.dense_tokens
            sub_out = output.new_empty((tok.numel(),) + tuple(output.shape[1:]))
            super().forward(
                layer, query[tok], key[tok], value[tok], kv_cache, md.dense_part, sub_out
            )
            output[tok] = sub_out

        # the sparse requests, one by one, over their K/V gathered from the paged cache
        num_pages, hkv, page, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_pages, hkv, 2 * page, -1).chunk(2, dim=2)
        layout = self._layout(layer, kv_cache)
        backend = get_backend(policy.backend)
        if id(policy) not in _ANNOUNCED:
            _ANNOUNCED.add(id(policy))
            r = plan.sparse[0]
            logger.info(
                "Prism: sparse pre-fill (%d new tokens over %d keys, layer %s): %s",
                plan.query_len(r), plan.seq_lens[r], idx, policy.describe(),
            )  # fmt: skip
            if policy.by_length:
                logger.warning(
                    "Prism vLLM backend: the policy's by_length buckets are not applied here; "
                    "every request runs the policy's base layers"
                )
        stats = policy.stats
        if stats is not None:
            stats.record_call(idx, sparse=True)
        for r in plan.sparse:
            s, e = plan.starts[r], plan.ends[r]
            k, v = gather_kv(key_cache, value_cache, md.block_table[r], plan.seq_lens[r], layout)
            out, sel, qh = sparse_prefill(scorer, backend, query[s:e], k, v, self.scale)
            output[s:e] = out.to(output.dtype)
            if stats is not None:
                stats.record_sparse(idx, sel, qh, k, self.scale, new_call=False)
        return output

    def _record_dense(self, layer, plan: BatchPlan | None, reason: str | None = None) -> None:
        stats = get_policy().stats
        if stats is None:
            return
        if reason is None:
            if self._unsupported:
                reason = "unsupported"
            elif plan is None:
                reason = "no_plan"
            else:
                reasons = set(plan.why.values())
                reason = reasons.pop() if len(reasons) == 1 else "mixed"
        stats.record_dense(_layer_index(layer), reason)


class PrismAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with Prism's sparse pre-fill (see the module docstring)."""

    # fp8 caches would need de-quantising the gathered K/V: not supported (yet)
    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[PrismAttentionImpl]:
        return PrismAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[PrismMetadataBuilder]:
        return PrismMetadataBuilder
