"""Hard-negative mining (paper §3.3 "Global-HNM"), one job per file.

* ``corpus.py``    -- read a collection: samples by sub-dataset, each with its de-duplicated corpus of positives
* ``embedding.py`` -- embed corpora and queries in fixed blocks shared out across ranks (also used by judge curation)
* ``search.py``    -- exact / faiss top-k search
* ``sampling.py``  -- ground-truth filtering, window sampling, rule-based top-K
* ``stats.py``     -- per-dataset statistics and the run summary
* ``mine.py``      -- :func:`mine_hard_negatives`: the above in order, writing mined shards, manifest and summary
"""

from mmembed.mining.sampling import filter_ranked, rule_based_negatives, sample_window_negatives
from mmembed.mining.search import topk_search

__all__ = ["filter_ranked", "rule_based_negatives", "sample_window_negatives", "topk_search"]
from mmembed.mining.corpus import content_key  # noqa: E402
from mmembed.mining.mine import mine_hard_negatives  # noqa: E402
from mmembed.mining.stats import DatasetMiningStats, MiningSummary  # noqa: E402

__all__ += ["DatasetMiningStats", "MiningSummary", "content_key", "mine_hard_negatives"]
