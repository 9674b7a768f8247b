"""What a mining run reports: per-dataset statistics and the run summary (``summary.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class DatasetMiningStats:
    """What mining did on one sub-dataset (one entry of ``summary.json``'s ``datasets``).

    Attributes:
        queries: Queries mined (= samples of the dataset).
        distinct_queries: Queries embedded: a query repeated in several samples (same instruction, text, pixels)
            is embedded once.
        corpus_size: Unique positives the queries were ranked against.
        merged_positives: Samples whose positive was merged into an earlier corpus entry (same id or content).
        search_k: Ranked-list depth searched per query.
        negatives_per_query: ``n`` (window) or ``k`` (rule).
        rank_mean: Mean 0-based rank of the chosen negatives in the filtered list (``rank_min``/``rank_max`` too).
        raw_rank_mean: The same in 1-based raw rank (before removing the positive and its duplicates).
        clamped_queries: Queries whose filtered list was shorter than the window end (window scaled down).
        shortest_list: Shortest filtered list among the clamped queries (None when none was clamped).
        clamp_warning: The sampler's warning text for this dataset, or None.
        false_negatives_planted: Known false negatives (``meta["false_negative_ids"]``) present in the corpus,
            summed over queries; None when the samples carry no such list.
        queries_with_false_negatives: Queries with at least one known false negative in the corpus.
        false_negatives_picked: Chosen negatives that are a known false negative of their query.
        queries_with_false_negative_picked: Queries with at least one such pick.
        false_negative_share: ``false_negatives_picked`` / all chosen negatives (None without ground truth) -- the
            share of "hard negatives" that are in fact positives, which judge curation exists to remove.
        shards: Output shard paths.
    """

    queries: int
    corpus_size: int
    merged_positives: int
    search_k: int
    negatives_per_query: int
    rank_mean: float
    rank_min: int
    rank_max: int
    raw_rank_mean: float
    raw_rank_min: int
    raw_rank_max: int
    clamped_queries: int = 0
    shortest_list: int | None = None
    clamp_warning: str | None = None
    false_negatives_planted: int | None = None
    queries_with_false_negatives: int | None = None
    false_negatives_picked: int | None = None
    queries_with_false_negative_picked: int | None = None
    false_negative_share: float | None = None
    shards: list[str] = field(default_factory=list)
    distinct_queries: int | None = None


@dataclass
class MiningSummary:
    """The result of :func:`mine_hard_negatives` (also written as ``summary.json``).

    Attributes:
        out_dir: Output folder.
        strategy: ``"window"`` or ``"rule"``.
        window: The rank window (window strategy), else None.
        n: Negatives per query (window) -- for ``rule`` the number kept is ``k``.
        k: Top-K of the rule strategy, else None.
        seed: Sampling seed.
        world_size: Ranks that shared the embedding work.
        queries: Queries mined over all datasets.
        datasets: Per-dataset statistics, by dataset name.
        skipped: Samples skipped while reading the input shards, by reason.
        timing: Seconds spent reading, embedding (this rank), searching + sampling, writing, and in total.
        queries_per_s: ``queries / timing["total_s"]`` -- end to end in the process that merged.
        manifest: Path of ``manifest.jsonl``.
        shards: All output shard paths.
        false_negatives_picked: Chosen negatives that are known false negatives, over the datasets that carry ground
            truth (None when none does).
        negatives_picked: Chosen negatives over those datasets.
        false_negative_share: ``false_negatives_picked / negatives_picked`` (None without ground truth).
    """

    out_dir: str
    strategy: str
    window: tuple[int, int] | None
    n: int
    k: int | None
    seed: int
    world_size: int
    queries: int
    datasets: dict[str, DatasetMiningStats]
    skipped: dict[str, int]
    timing: dict[str, float]
    queries_per_s: float
    manifest: str
    shards: list[str]
    false_negatives_picked: int | None = None
    negatives_picked: int | None = None
    false_negative_share: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def false_negative_line(self) -> str:
        """One line on the planted false negatives among the chosen negatives (printed also when there are 0)."""
        if self.false_negative_share is None:
            return "false negatives among chosen negatives: unknown (the samples carry no ground truth)"
        return (f"false negatives among chosen negatives: {self.false_negatives_picked} of {self.negatives_picked} "
                f"({100 * self.false_negative_share:.2f}%)")


def false_negative_totals(datasets: dict[str, DatasetMiningStats]) -> tuple[int | None, int | None, float | None]:
    """(false negatives picked, negatives picked, share) over the datasets whose samples carry ground truth."""
    known = [s for s in datasets.values() if s.false_negatives_picked is not None]
    if not known:
        return None, None, None
    picked = sum(s.false_negatives_picked or 0 for s in known)
    total = sum(s.queries * s.negatives_per_query for s in known)
    return picked, total, round(picked / total, 6) if total else 0.0
