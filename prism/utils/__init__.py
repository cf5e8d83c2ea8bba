"""Utilities. ``prism.utils.patch``: the published repository's ``apply_patch`` usage."""
