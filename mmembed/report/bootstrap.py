"""Paired bootstrap over queries, from the TREC run and qrels files the eval callbacks log as run artifacts.

Seed-to-seed variation (``stats``) is one source of noise; the finite set of eval queries is another. For a claim
"A better than B" on MMEB or VisDoc, each seed that both sides ran gives two runs scored on the *same* queries. One
bootstrap replicate resamples the queries of every eval set with replacement (the same draw for A and B: paired),
recomputes each side's overall score (mean over sets of the mean per-query score, x100, as ``mmembed.eval`` reports
it) and averages the difference A - B over the seeds. The 95% percentile interval of the replicates is reported; the
claim holds beyond query noise when the whole interval lies on the claimed side of 0.

Per-query scores are recomputed from the files: MMEB Precision@1 (the top-ranked candidate is relevant), VisDoc
NDCG@5 (linear gain, ``mmembed.eval.metrics.ndcg_from_ranking``), documents ordered as ``mmembed.eval.trec`` does.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

WHEN_ORDER = {"start": 0, "step": 1, "epoch": 2, "end": 3}
_FOLDER = re.compile(r"step(\d+)-(\w+)")

QueryScores = dict[str, dict[str, float]]  # {set: {qid: score x100}}


def per_query(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]], metric: str
              ) -> dict[str, float]:
    """``{qid: score x100}`` for the qrels queries with a relevant document (``precision@1`` or ``ndcg@5``)."""
    from mmembed.eval.metrics import ndcg_from_ranking
    from mmembed.eval.trec import _ordered  # the kit's trec_eval document order (score, then id, descending)

    out = {}
    for qid, judged in qrels.items():
        if not any(r > 0 for r in judged.values()):
            continue
        ranked = [d for d, _ in _ordered(run.get(qid, {}))]
        if metric == "precision@1":
            out[qid] = 100.0 * float(bool(ranked) and judged.get(ranked[0], 0) > 0)
        elif metric.startswith("ndcg@"):
            value = ndcg_from_ranking([judged.get(d, 0) for d in ranked], list(judged.values()),
                                      int(metric.split("@")[1]))
            out[qid] = 100.0 * (0.0 if math.isnan(value) else value)
        else:
            raise ValueError(f"no per-query score for metric {metric!r}")
    return out


def run_query_scores(client: Any, run_id: str, benchmark: str) -> QueryScores | None:
    """The per-query scores of a run's last ``benchmark`` evaluation (its logged artifacts); None without files."""
    from mlflow.exceptions import MlflowException

    from mmembed.eval.trec import read_qrels, read_run

    try:
        folders = [a.path for a in client.list_artifacts(run_id, "eval") if a.is_dir]
    except (MlflowException, OSError):
        return None
    found = []
    for path in folders:
        m = _FOLDER.fullmatch(Path(path).name)
        if m:
            found.append(((int(m.group(1)), WHEN_ORDER.get(m.group(2), -1)), path))
    for _, path in sorted(found, reverse=True):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = Path(client.download_artifacts(run_id, f"{path}/{benchmark}", tmp))
            except (MlflowException, OSError):
                continue
            if not (local / "metrics.json").is_file() and (local / "E" / "metrics.json").is_file():
                local = local / "E"  # evaluated with a reranker: E is the embedder alone (the logged val/<bench>)
            if not (local / "metrics.json").is_file():
                continue
            meta = json.loads((local / "metrics.json").read_text())
            out: QueryScores = {}
            for name, s in meta.get("sets", {}).items():
                if s.get("run_file") and s.get("qrels_file") and (local / s["run_file"]).is_file():
                    out[name] = per_query(read_run(local / s["run_file"]), read_qrels(local / s["qrels_file"]),
                                          meta["metric"])
            return out or None
    return None


def paired_bootstrap(pairs: Sequence[tuple[QueryScores, QueryScores]], reps: int = 1000, seed: int = 0
                     ) -> tuple[float, np.ndarray] | None:
    """``(observed difference, replicates)`` of ``overall(A) - overall(B)`` averaged over ``pairs`` (one per seed),
    resampling each set's queries (the queries both sides scored); None when nothing pairs up."""
    rng = np.random.default_rng(seed)
    per_seed = []
    for a, b in pairs:
        sets = []
        for name in sorted(set(a) & set(b)):
            qids = sorted(set(a[name]) & set(b[name]))
            if qids:
                sets.append(np.array([a[name][q] - b[name][q] for q in qids]))
        if sets:
            per_seed.append(sets)
    if not per_seed or reps < 1:
        return None
    observed = float(np.mean([np.mean([d.mean() for d in sets]) for sets in per_seed]))
    total = np.zeros(reps)
    for sets in per_seed:
        overall = np.zeros(reps)
        for d in sets:
            idx = rng.integers(0, len(d), size=(reps, len(d)))
            overall += d[idx].mean(axis=1)
        total += overall / len(sets)
    return observed, total / len(per_seed)


class QueryBootstrap:
    """Per-query scores of runs (cached), and the paired bootstrap of a claim's two cells."""

    def __init__(self, client: Any, reps: int = 1000) -> None:
        self.client, self.reps = client, reps
        self._cache: dict[tuple[str, str], QueryScores | None] = {}

    def scores(self, run_id: str, benchmark: str) -> QueryScores | None:
        key = (run_id, benchmark)
        if key not in self._cache:
            self._cache[key] = run_query_scores(self.client, run_id, benchmark)
        return self._cache[key]

    def compare(self, a_runs: Mapping[str, str], b_runs: Mapping[str, str], benchmark: str
                ) -> tuple[float, float, float, int] | None:
        """``(difference, 2.5%, 97.5%, seeds)`` over the seeds both sides ran with eval files; None when none did.

        ``benchmark="avg"``: the paper's "Avg.", per replicate the mean of the MMEB and VisDoc differences.
        """
        benches = ("mmeb", "visdoc") if benchmark == "avg" else (benchmark,)
        seeds = [s for s in sorted(set(a_runs) & set(b_runs))
                 if all(self.scores(a_runs[s], b) and self.scores(b_runs[s], b) for b in benches)]
        if not seeds:
            return None
        results = [paired_bootstrap([(self.scores(a_runs[s], b), self.scores(b_runs[s], b)) for s in seeds],
                                    self.reps, seed=i) for i, b in enumerate(benches)]
        if any(r is None for r in results):
            return None
        observed = float(np.mean([r[0] for r in results]))
        lo, hi = np.percentile(np.mean([r[1] for r in results], axis=0), [2.5, 97.5])
        return observed, float(lo), float(hi), len(seeds)
