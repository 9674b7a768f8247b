"""Measuring a judge against ground truth: held-out relevance questions of the synthetic world.

Reads records written by :mod:`mmembed.data.synth.judge_questions` (their ``"judge"`` field), scores them with a
:class:`~mmembed.judge.Judge` and reports accuracy (overall, per relation, per dataset), the share of 'yes', the ROC
AUC of ``logit(yes) - logit(no)``, and precision / recall of 'yes' on planted false negatives among the
non-ground-truth pairs -- the pairs curation judges: recall = false negatives called 'yes' / false negatives;
precision = false negatives called 'yes' / all non-ground-truth pairs called 'yes'. The majority-answer accuracy is
given for scale.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from mmembed.judge.judge import Judge, JudgePair
from mmembed.types import Item


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def load_pairs(records_path: str | Path, image_root: str | Path | None = None) -> tuple[list[JudgePair], list[dict]]:
    """The judge pairs of a records file (``image_root`` default: the file's folder) and their ``judge`` fields."""
    path = Path(records_path)
    root = Path(image_root) if image_root is not None else path.parent
    records = json.loads(path.read_text())
    infos = [r["judge"] for r in records if "judge" in r]
    if not infos:
        raise ValueError(f"{path} has no records with a 'judge' field; generate them with the synthetic world")

    def item(side: dict) -> Item:
        return Item(text=side.get("text"), image=root / side["image"] if side.get("image") else None)

    return [JudgePair(item(j["query"]), item(j["target"]), j["instruction"]) for j in infos], infos


def evaluate_judge(judge: Judge, records_path: str | Path, image_root: str | Path | None = None, *,
                   batch_size: int = 8, show_progress: bool | None = None) -> dict[str, Any]:
    """Score the held-out questions and compare with their answers; returns the metrics (JSON-ready)."""
    pairs, infos = load_pairs(records_path, image_root)
    scores = judge.score(pairs, batch_size=batch_size, show_progress=show_progress)
    said_yes = scores.relevant.tolist()
    truth = [j["answer"] == "yes" for j in infos]
    correct = [s == t for s, t in zip(said_yes, truth)]
    by_rel: dict[str, list[bool]] = defaultdict(list)
    by_ds: dict[str, list[bool]] = defaultdict(list)
    for j, c in zip(infos, correct):
        by_rel[j["relation"]].append(c)
        by_ds[j["dataset"]].append(c)
    non_gt = [(j["relation"] == "false_negative", s) for j, s in zip(infos, said_yes) if j["relation"] != "positive"]
    fn_yes = sum(fn and s for fn, s in non_gt)
    n_yes = sum(truth)
    return {
        "pairs": len(pairs),
        "accuracy": _ratio(sum(correct), len(correct)),
        "majority_accuracy": _ratio(max(n_yes, len(truth) - n_yes), len(truth)),
        "yes_rate": _ratio(sum(said_yes), len(said_yes)),
        "true_yes_rate": _ratio(n_yes, len(truth)),
        "accuracy_by_relation": {k: _ratio(sum(v), len(v)) for k, v in sorted(by_rel.items())},
        "pairs_by_relation": {k: len(v) for k, v in sorted(by_rel.items())},
        "accuracy_by_dataset": {k: _ratio(sum(v), len(v)) for k, v in sorted(by_ds.items())},
        "false_negative_pairs": sum(fn for fn, _ in non_gt),
        "fn_yes_recall": _ratio(fn_yes, sum(fn for fn, _ in non_gt)),
        "fn_yes_precision": _ratio(fn_yes, sum(s for _, s in non_gt)),
        "mean_score_true_yes": _mean([v for v, t in zip(scores.score.tolist(), truth) if t]),
        "mean_score_true_no": _mean([v for v, t in zip(scores.score.tolist(), truth) if not t]),
        "auc": _auc(scores.score.tolist(), truth),
    }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _auc(scores: list[float], truth: list[bool]) -> float | None:
    """ROC AUC of the score for 'yes' (Mann-Whitney: share of (yes, no) pairs ranked right; ties count half).

    Threshold-free: it shows whether the judge orders pairs right even when ``logit(yes) > logit(no)`` is biased.
    """
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return round(wins / (len(pos) * len(neg)), 4)
