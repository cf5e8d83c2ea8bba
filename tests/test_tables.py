"""prism.utils.tables: the one markdown-table writer of the harness and the benchmarks."""

import math

import pytest

from prism.utils.tables import fmt_cell, markdown_records, markdown_table


def test_markdown_table_layout_and_cells():
    text = markdown_table(["S", "ms", "note"], [[8192, 1.23456, None], [16384, math.nan, "OOM"]], 2)
    assert text.splitlines() == [
        "| S | ms | note |",
        "|---|---|---|",
        "| 8192 | 1.23 | – |",
        "| 16384 | – | OOM |",
    ]
    assert markdown_table(["a"], [[0.5]]) == "| a |\n|---|\n| 0.5 |"  # str() without digits
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        markdown_table(["a", "b"], [[1]])


def test_fmt_cell_and_records():
    assert (fmt_cell(None), fmt_cell(float("nan"), 3), fmt_cell(2, 3), fmt_cell(0.12345, 3)) == (
        "–",
        "–",
        "2",
        "0.123",
    )
    text = markdown_records([{"S": 1, "x": 0.5}, {"S": 2}], digits=1)
    assert text.splitlines()[2:] == ["| 1 | 0.5 |", "| 2 |  |"]
