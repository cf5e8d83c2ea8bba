"""Old import path of the pooling helpers; they live in :mod:`prism.scorers._pooling`."""

from ._pooling import gqa_scores, inv_sqrt, pool_blocks

__all__ = ["gqa_scores", "inv_sqrt", "pool_blocks"]
