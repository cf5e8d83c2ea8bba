"""Input validation shared by scorers, backends and the attention entry points."""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    """Validate ``q [B, Hq, Sq, D]`` against ``k [B, Hkv, Sk, D]``; raise a clear error if wrong."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have rank 4 [B, H, S, D], got shape {tuple(t.shape)} (rank {t.dim()})"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if q.dtype != k.dtype:
        raise TypeError(f"dtype mismatch: q is {q.dtype}, k is {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"device mismatch: q is on {q.device}, k is on {k.device}")
    b, hq, sq, d = q.shape
    bk, hkv, sk, dk = k.shape
    if b != bk:
        raise ValueError(f"batch mismatch: q has B={b}, k has B={bk}")
    if d != dk:
        raise ValueError(f"head dim mismatch: q has D={d}, k has D={dk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq ({hq}) must be a multiple of Hkv ({hkv}) for grouped-query attention")
    if sq == 0:
        raise ValueError("Sq must be >= 1")
    if sq > sk:
        raise ValueError(
            f"Sq ({sq}) > Sk ({sk}): queries must be the last Sq positions of the keys "
            "(Sk = cached prefix + Sq)"
        )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Sk, D]``, ``v [B, Hkv, Sk, Dv]``."""
    check_qk(q, k)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 4:
        raise ValueError(f"v must have rank 4 [B, H, S, D], got shape {tuple(v.shape)}")
    if v.dtype != k.dtype:
        raise TypeError(f"dtype mismatch: k is {k.dtype}, v is {v.dtype}")
    if v.device != k.device:
        raise ValueError(f"device mismatch: k is on {k.device}, v is on {v.device}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v shape {tuple(v.shape)} must match k {tuple(k.shape)} in B, Hkv and Sk")


def check_threshold(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
