"""A *simulated expert judge* for the synthetic world only: it answers from the world's ground truth.

The paper's stage 3 asks an expert MLLM (Qwen3-VL) whether each retrieved candidate is relevant. No such weights
exist on the kit's machines, and judges trained here stay at chance (docs/judge.md), so on the synthetic world a
judge of known quality stands in for the expert: :class:`SimulatedJudge` reads **only** each training sample's
ground truth -- the positive's id and ``meta["false_negative_ids"]`` (other corpus candidates that also answer the
query) -- plus, for its error model, the candidates' retrieval scores. It never looks at pixels or text.

Error model, per candidate of a query's retrieved list (ground truth removed):

- relevant (its id is the positive's or in ``false_negative_ids``): 'yes' with probability ``recall``;
- not relevant: 'yes' with probability ``false_yes_rate * 2 * p``, where ``p`` in [0, 1] is the candidate's score
  percentile among the query's non-relevant candidates (0 = lowest score, 1 = highest, ties averaged; 0.5 when there
  is only one). A real judge errs most on the hardest candidates; the factor ``2 * p`` averages to exactly 1 over a
  query's non-relevant candidates, so the measured false-yes rate equals ``false_yes_rate``.

Each draw is a uniform number hashed from ``(seed, query id, candidate id)``: the answers are deterministic, do not
depend on the order or the rank that judges them, and a candidate's answer does not change when others are added.
Answers come out as the MLLM judge's do, next-token logits of 'yes' and 'no' (``+-ANSWER_LOGIT``), so curation's
manifest, decisions and summary are the same files with the same fields.

Data without ground truth (a sample with no ``meta["false_negative_ids"]``, i.e. anything but the synthetic world)
is refused with one line: the simulated judge cannot judge it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: What every output of this judge calls it (curation summary and log line, manifest, MLflow tags and run names).
SIMULATED_LABEL = "simulated expert judge"
#: The ``judge.model`` value that selects it.
SIMULATED = "simulated"
#: The 'yes' / 'no' logits it emits: (+A, -A) for 'yes', (-A, +A) for 'no'.
ANSWER_LOGIT = 4.0
#: Bumped whenever the error model changes, so cached judgments are not reused across versions.
_VERSION = "sim-v1"


class NoGroundTruthError(ValueError):
    """The data carries no ground truth (``meta["false_negative_ids"]``) for the simulated judge to answer from."""


def _uniform(seed: int, query_id: str, candidate_id: str) -> float:
    """A deterministic uniform draw in [0, 1) for one (query, candidate) pair."""
    digest = hashlib.blake2b(f"{seed}\0{query_id}\0{candidate_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def score_percentiles(scores: Sequence[float]) -> list[float]:
    """Each score's percentile within ``scores``: the share of the others below it, ties counted half.

    Returns values in [0, 1] whose mean is exactly 0.5 (each pair contributes 1 in total); a single score gets 0.5.
    """
    m = len(scores)
    if m == 1:
        return [0.5]
    return [(sum(t < s for t in scores) + 0.5 * (sum(t == s for t in scores) - 1)) / (m - 1) for s in scores]


@dataclass(frozen=True)
class SimulatedJudge:
    """Answers relevance from the synthetic world's ground truth with a controlled error rate (module docstring).

    Args:
        recall: Probability of 'yes' for a relevant candidate (a planted false negative).
        false_yes_rate: Mean probability of 'yes' for a non-relevant candidate; the probability of one candidate is
            ``false_yes_rate * 2 * p`` (``p`` its score percentile among the query's non-relevant candidates), so it
            must be at most 0.5.
        seed: Seed of the deterministic draws.
    """

    recall: float = 0.9
    false_yes_rate: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.recall <= 1.0:
            raise ValueError(f"judge.recall={self.recall} must be within [0, 1]")
        if not 0.0 <= self.false_yes_rate <= 0.5:
            raise ValueError(f"judge.false_yes_rate={self.false_yes_rate} must be within [0, 0.5] (the hardest "
                             "candidate's rate is twice the setting)")

    #: Curation reads the ground truth for this judge instead of building image/text pairs.
    uses_ground_truth = True
    model_type = SIMULATED

    @property
    def label(self) -> str:
        """Short name for column headers and tags: ``"simulated expert judge"``."""
        return SIMULATED_LABEL

    @property
    def display_name(self) -> str:
        """The label with its settings, for log lines and run names."""
        return f"{SIMULATED_LABEL} (recall {self.recall:g}, false-yes {self.false_yes_rate:g}, seed {self.seed})"

    @property
    def settings(self) -> dict[str, Any]:
        """What the judgments depend on (recorded in the summary)."""
        return {"model": SIMULATED, "recall": self.recall, "false_yes_rate": self.false_yes_rate, "seed": self.seed}

    @property
    def fingerprint(self) -> str:
        """Part of the judgment cache key: changing any setting re-judges."""
        return f"{_VERSION}/recall={self.recall!r}/false_yes_rate={self.false_yes_rate!r}/seed={self.seed}"

    @staticmethod
    def ground_truth(sample: Any) -> set[str]:
        """The ids a candidate may carry to be relevant: the positive's and ``meta["false_negative_ids"]``.

        Raises:
            NoGroundTruthError: The sample has no ``meta["false_negative_ids"]`` (not the synthetic world).
        """
        meta = sample.meta if isinstance(sample.meta, dict) else {}
        fn = meta.get("false_negative_ids")
        if fn is None:
            raise NoGroundTruthError(
                f"the {SIMULATED_LABEL} answers only from the synthetic world's ground truth, and sample "
                f"{sample.id!r} (dataset {sample.dataset!r}) has no meta['false_negative_ids']; use a real judge "
                "folder (judge.model=<folder>) or judge.strategy=rule|margin")
        return {str(c) for c in fn} | ({sample.positive.id} if sample.positive.id else set())

    def answer(self, query_id: str, relevant_ids: set[str], candidate_ids: Sequence[str],
               scores: Sequence[float]) -> list[bool]:
        """'yes' (True) / 'no' (False) for each retrieved candidate of one query.

        Args:
            query_id: The query's sample id (part of each draw's seed).
            relevant_ids: :meth:`ground_truth` of the sample.
            candidate_ids: The retrieved candidates, in retrieval order.
            scores: Their retrieval scores (same order).
        """
        if len(candidate_ids) != len(scores):
            raise ValueError(f"{len(candidate_ids)} candidates but {len(scores)} scores for query {query_id!r}")
        relevant = [c in relevant_ids for c in candidate_ids]
        others = [i for i, r in enumerate(relevant) if not r]
        pct = dict(zip(others, score_percentiles([float(scores[i]) for i in others]))) if others else {}
        out = []
        for i, (cid, rel) in enumerate(zip(candidate_ids, relevant)):
            p_yes = self.recall if rel else self.false_yes_rate * 2.0 * pct[i]
            out.append(_uniform(self.seed, query_id, cid) < p_yes)
        return out

    def logits(self, answers: Sequence[bool]) -> tuple[list[float], list[float]]:
        """``(yes, no)`` next-token logits for the answers, as the MLLM judge reports them."""
        return ([ANSWER_LOGIT if a else -ANSWER_LOGIT for a in answers],
                [-ANSWER_LOGIT if a else ANSWER_LOGIT for a in answers])


def judge_label(model: str | None) -> str | None:
    """What to call the judge that a ``judge.model`` setting selects (for report headers and tags, no loading).

    ``"simulated"`` -> ``"simulated expert judge"``; a folder -> ``"MLLM judge"``; None -> None (no judge).
    """
    if not model:
        return None
    return SIMULATED_LABEL if str(model) == SIMULATED else "MLLM judge"


def load_judge(model: str, *, recall: float = 0.9, false_yes_rate: float = 0.05, seed: int = 0, **kwargs: Any):
    """The judge a ``judge.model`` setting names: ``"simulated"`` -> :class:`SimulatedJudge`, else a checkpoint
    folder (or kit preset) -> :meth:`mmembed.judge.Judge.from_pretrained` (``kwargs`` go there)."""
    if str(model) == SIMULATED:
        return SimulatedJudge(recall=recall, false_yes_rate=false_yes_rate, seed=seed)
    from mmembed.judge.judge import Judge

    return Judge.from_pretrained(model, **kwargs)
