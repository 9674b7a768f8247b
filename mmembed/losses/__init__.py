"""Losses: InfoNCE with gathered negatives, gradient caching, reranker objectives (pure functions and modules)."""

from mmembed.losses.gradcache import GradCacheOutput, gradcache_step, split_batch
from mmembed.losses.infonce import InfoNCELoss, InfoNCEOutput, gather_rows, ids_to_tensor, info_nce, stable_hash
from mmembed.losses.reranker import (
    answer_logits,
    listwise_rerank_loss,
    next_token_loss,
    pointwise_rerank_loss,
    pointwise_scores,
)

__all__ = [
    "GradCacheOutput",
    "InfoNCELoss",
    "InfoNCEOutput",
    "answer_logits",
    "gather_rows",
    "gradcache_step",
    "ids_to_tensor",
    "info_nce",
    "listwise_rerank_loss",
    "next_token_loss",
    "pointwise_rerank_loss",
    "pointwise_scores",
    "split_batch",
    "stable_hash",
]
