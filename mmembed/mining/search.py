"""Moved to :mod:`mmembed.index.search` (saved indexes search with it too, and the index sits below mining)."""

from mmembed.index.search import topk_search

__all__ = ["topk_search"]
