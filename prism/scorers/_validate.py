"""Config validation helpers shared by scorer configs."""

from __future__ import annotations


def check_int(name: str, value, minimum: int) -> None:
    """Raise TypeError unless ``value`` is an int (not a bool), ValueError if it is < ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
