"""Markdown tables for the harness summaries and the benchmark reports.

markdown_table(["S", "ms"], [[8192, 1.2345]], digits=2)
# | S | ms |
# |---|---|
# | 8192 | 1.23 |
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["fmt_cell", "markdown_records", "markdown_table"]

MISSING = "–"


def fmt_cell(value: Any, digits: int | None = None, missing: str = MISSING) -> str:
    """One cell: ``missing`` for None / NaN, a float with ``digits`` decimals (``str`` when
    ``digits`` is None), anything else through ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    header: Sequence[Any],
    rows: Sequence[Sequence[Any]],
    digits: int | None = None,
    missing: str = MISSING,
) -> str:
    """A GitHub-flavoured markdown table (no trailing newline); cells go through
    :func:`fmt_cell`. Every row must have as many cells as the header."""
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise ValueError(f"row {i} has {len(r)} cells, the header {len(header)}")
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt_cell(c, digits, missing) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_records(
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    digits: int | None = None,
    missing: str = "",
) -> str:
    """A table of dict rows: ``columns`` (default: the first record's keys) as the header, a
    key missing from a record shown as ``missing``."""
    cols = list(columns if columns is not None else (records[0].keys() if records else []))
    rows = [[r.get(c) for c in cols] for r in records]
    return markdown_table(cols, rows, digits=digits, missing=missing)
