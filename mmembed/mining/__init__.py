"""Hard-negative mining: exact/faiss top-k search and negative sampling from ranked lists."""

from mmembed.mining.sampling import filter_ranked, rule_based_negatives, sample_window_negatives
from mmembed.mining.search import topk_search

__all__ = ["filter_ranked", "rule_based_negatives", "sample_window_negatives", "topk_search"]
from mmembed.mining.mine import DatasetMiningStats, MiningSummary, content_key, mine_hard_negatives  # noqa: E402

__all__ += ["DatasetMiningStats", "MiningSummary", "content_key", "mine_hard_negatives"]
