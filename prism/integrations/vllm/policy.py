"""The policy the vLLM backend runs, one per process (plain Python: no vLLM import).

vLLM builds its engine (and its worker processes) itself, so the policy comes from the
environment, read once per process on first use:

* ``PRISM_POLICY``: a policy YAML file or a shipped config name (``prism``, ``hf/smollm2``,
  ``policies/prism_plus_window``, ...; :func:`prism.config.load_config` resolves it). Unset: the
  default :class:`~prism.policy.PrismPolicy` (Prism scorer, threshold 0.95, flex kernel).
* ``PRISM_POLICY_OVERRIDES``: ``key=value`` overrides on top of it, separated by spaces or
  commas (``"threshold=0.9 backend=reference min_len=1024"``).

In the process that runs the model (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, or a test) the policy
can also be set directly with :func:`set_policy`; :func:`prism.stats.collect_stats` on
:func:`get_policy` collects the per-layer density there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...policy import PrismPolicy

__all__ = [
    "ENV_OVERRIDES",
    "ENV_POLICY",
    "get_policy",
    "policy_from_env",
    "reset_policy",
    "set_policy",
]

ENV_POLICY = "PRISM_POLICY"
ENV_OVERRIDES = "PRISM_POLICY_OVERRIDES"

_POLICY: PrismPolicy | None = None


def policy_from_env(environ: Mapping[str, str] | None = None) -> PrismPolicy:
    """The policy that ``PRISM_POLICY`` / ``PRISM_POLICY_OVERRIDES`` describe."""
    env = os.environ if environ is None else environ
    source = env.get(ENV_POLICY) or None
    overrides = [o for o in re.split(r"[\s,]+", env.get(ENV_OVERRIDES, "")) if o]
    if source is None and not overrides:
        return PrismPolicy()
    return PrismPolicy.from_config(source, overrides)


def get_policy() -> PrismPolicy:
    """This process's policy (built from the environment on first use)."""
    global _POLICY
    if _POLICY is None:
        _POLICY = policy_from_env()
    return _POLICY


def set_policy(
    policy: PrismPolicy | str | Path | Mapping[str, Any] | None = None, **params: Any
) -> PrismPolicy:
    """Set this process's policy: a :class:`PrismPolicy`, a config (file, name or mapping, with
    ``params`` as overrides) or, with ``policy=None``, ``PrismPolicy(**params)``."""
    global _POLICY
    if isinstance(policy, PrismPolicy):
        if params:
            raise ValueError("pass either a built policy or parameters, not both")
        _POLICY = policy
    elif policy is None:
        _POLICY = PrismPolicy(**params)
    else:
        _POLICY = PrismPolicy.from_config(policy, **params)
    return _POLICY


def reset_policy() -> None:
    """Forget the policy: the next :func:`get_policy` reads the environment again."""
    global _POLICY
    _POLICY = None
