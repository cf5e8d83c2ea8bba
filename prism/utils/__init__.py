"""Utilities. ``prism.utils.patch``: the published repository's ``apply_patch`` usage;
``prism.utils.tables``: markdown tables for the harness summaries and the benchmarks."""
