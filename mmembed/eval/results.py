"""What the MMEB, VisDoc and Table 5 runners share (their results, not a runner): result types, E+R reranking,
run/qrels files, metrics.json, the bar chart.

Scores are reported **x100** (percent), as in the paper's Tables 3-4: a Precision@1 of 0.634 is stored as 63.4. Every
aggregate is a plain mean over *sets* (subsets), as the public leaderboards compute them: a meta-task / collection
score is the mean of its sets, IND / OOD the mean of the sets in that split, and ``overall`` the mean of all sets
(not of the meta-task means).

Files written by one runner call under ``out_dir``::

    runs/{set}.run        TREC run: the scored candidates of every query, best first
    qrels/{set}.qrels     the judgments the set was scored against
    metrics.json          every number of the call (see BenchmarkResult.to_dict)
    scores.png            one bar per set, coloured by meta-task / collection

Two-stage ("E+R") mode: when a ``reranker`` is given, each query's top-``rerank_k`` candidates by embedding score are
re-ordered by the reranker (paper §5.2: pointwise reranking of the embedder's top 5); everything below the head keeps
its embedding order. Without one, the runner reports the embedder alone ("E").
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from mmembed.eval import trec
from mmembed.types import Item, Role

SCALE = 100.0
"""Every reported score is the metric in [0, 1] times this (percent, like the paper's tables)."""


@runtime_checkable
class Encoder(Protocol):
    """Anything with :meth:`mmembed.Embedder.encode`'s signature (the runners need nothing else)."""

    def encode(self, items: list[Item], role: Role = "query", batch_size: int = 16,
               show_progress: bool | None = None) -> Tensor: ...


@runtime_checkable
class SupportsRerank(Protocol):
    """Second stage of E+R: scores a query's shortlisted candidates (higher = more relevant)."""

    def rerank(self, query: Item, candidates: Sequence[Item]) -> Sequence[float] | Tensor: ...


@dataclass
class SetScore:
    """The result of one evaluated set (an MMEB subset or a VisDoc set).

    Attributes:
        name: Set name as found in the data.
        group: Meta-task (MMEB) or collection (VisDoc); ``other`` when unknown.
        split: ``ind`` / ``ood``, or ``None`` when unknown.
        score: The benchmark's main metric x100 (MMEB: Precision@1, VisDoc: NDCG@5).
        metrics: Every metric computed for the set, x100, keyed like ``ndcg@5``.
        num_queries: Queries scored (MMEB: rows of the parquet).
        num_candidates: Unique candidates embedded.
        run_file: Path of the TREC run file, relative to the result's ``out_dir``.
        qrels_file: Path of the TREC qrels file, relative to the result's ``out_dir``.
        seconds: Wall time spent on the set (embedding included).
        stderr: Standard error of ``score`` over the set's queries (x100): binomial ``sqrt(p(1-p)/n)`` for
            Precision@1, the sample standard deviation over ``sqrt(n)`` for NDCG; None when unknown.
    """

    name: str
    group: str
    split: str | None
    score: float
    metrics: dict[str, float]
    num_queries: int
    num_candidates: int
    run_file: str | None = None
    qrels_file: str | None = None
    seconds: float = 0.0
    stderr: float | None = None


def binomial_stderr(score: float, n: int) -> float:
    """Standard error (x100) of a proportion given x100, over ``n`` independent queries."""
    p = score / SCALE
    return SCALE * math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 and math.isfinite(p) else float("nan")


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]  # a set with no judged query reports NaN: leave it out
    return math.fsum(finite) / len(finite) if finite else float("nan")


@dataclass
class BenchmarkResult:
    """All the numbers of one runner call, and where its files are.

    Attributes:
        benchmark: ``mmeb`` or ``visdoc``.
        metric: Name of the main metric (``precision@1`` or ``ndcg@5``).
        mode: ``E`` (embedder only) or ``E+R`` (embedder shortlist re-ordered by a reranker).
        sets: Per-set results, in evaluation order.
        out_dir: Folder holding the files, or ``None`` when nothing was written.
        extra: Free-form context stored in metrics.json (model, step, ...).
    """

    benchmark: str
    metric: str
    mode: str
    sets: dict[str, SetScore] = field(default_factory=dict)
    out_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> dict[str, float]:
        """Mean score per meta-task / collection (x100), groups in first-seen order."""
        names: dict[str, list[float]] = {}
        for s in self.sets.values():
            names.setdefault(s.group, []).append(s.score)
        return {g: _mean(v) for g, v in names.items()}

    @property
    def splits(self) -> dict[str, float]:
        """Mean score over the IND and over the OOD sets (x100); a split without sets is absent."""
        out = {}
        for split in ("ind", "ood"):
            scores = [s.score for s in self.sets.values() if s.split == split]
            if scores:
                out[split] = _mean(scores)
        return out

    @property
    def overall(self) -> float:
        """Mean score over all sets (x100), as MMEB and VisDoc report "Overall"."""
        return _mean([s.score for s in self.sets.values()])

    @property
    def overall_stderr(self) -> float:
        """Standard error of ``overall`` (x100): the sets' errors combined as independent, over the set count."""
        errs = [s.stderr for s in self.sets.values() if s.stderr is not None and math.isfinite(s.stderr)
                and math.isfinite(s.score)]
        if not errs:
            return float("nan")
        return math.sqrt(math.fsum(e * e for e in errs)) / len(errs)

    @property
    def num_queries(self) -> int:
        """Queries scored over all sets."""
        return sum(s.num_queries for s in self.sets.values())

    def overall_line(self) -> str:
        """``overall 19.82 ± 0.52 (SE over 1024 queries)``: the headline number with its standard error."""
        return f"overall {self.overall:.2f} ± {self.overall_stderr:.2f} (SE over {self.num_queries} queries)"

    @property
    def metrics_file(self) -> Path | None:
        return self.out_dir / "metrics.json" if self.out_dir else None

    @property
    def plot_file(self) -> Path | None:
        return self.out_dir / "scores.png" if self.out_dir else None

    def flat(self, prefix: str | None = None) -> dict[str, float]:
        """Scalars for a logger: ``{prefix}/{set}``, ``{prefix}/{group}``, ``{prefix}/ind|ood``, ``{prefix}/overall``.

        Args:
            prefix: Key prefix; default ``val/{benchmark}``.
        """
        prefix = f"val/{self.benchmark}" if prefix is None else prefix
        out = {f"{prefix}/{name}": s.score for name, s in self.sets.items()}
        for key, value in {**self.groups, **self.splits, "overall": self.overall}.items():
            full = f"{prefix}/{key}"
            if full in out and out[full] != value:
                raise ValueError(f"set name {key!r} collides with a group / split name; rename the set")
            out[full] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """The metrics.json content."""
        return {
            "benchmark": self.benchmark,
            "metric": self.metric,
            "mode": self.mode,
            "scale": SCALE,
            "overall": self.overall,
            "overall_stderr": self.overall_stderr,
            "splits": self.splits,
            "groups": self.groups,
            "sets": {name: asdict(s) for name, s in self.sets.items()},
            "extra": self.extra,
        }

    def write(self) -> None:
        """Write metrics.json and scores.png into ``out_dir``."""
        if self.out_dir is None:
            raise ValueError("this result has no out_dir to write into")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, allow_nan=True, default=str)
        self.metrics_file.write_text(text + "\n", encoding="utf-8")
        if self.sets:
            plot_scores(self, self.plot_file)

    def artifacts(self) -> list[Path]:
        """Every file this result wrote (metrics.json, plot, run and qrels files)."""
        if self.out_dir is None:
            return []
        files = [self.metrics_file, self.plot_file]
        for s in self.sets.values():
            files += [self.out_dir / f for f in (s.run_file, s.qrels_file) if f]
        return [f for f in files if f.exists()]


# ------------------------------------------------------------------------------------------------------ E+R
class CachedEncoder:
    """An :class:`Encoder` that remembers every embedding it computed, so E and E+R runs embed each item once.

    Items are keyed by content (role, text, instruction, kind and the image: its path, or the identity of a PIL
    image). The runners re-read their data on every call, so equal items arrive as new objects: keying by content
    lets the second (E+R) run, and later evaluations with a fixed embedder, reuse the first run's embeddings.

    Args:
        encoder: The embedder to wrap.
    """

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self._cache: dict[tuple, Tensor] = {}
        self._alive: list = []

    @staticmethod
    def key(item: Item, role: str) -> tuple:
        image = item.image
        image_key = None if image is None else (str(image) if isinstance(image, str | Path) else ("id", id(image)))
        return role, item.text, item.instruction, item.kind, image_key

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()
        self._alive.clear()

    def encode(self, items: list[Item], role: Role = "query", batch_size: int = 16,
               show_progress: bool | None = None) -> Tensor:
        keys = [self.key(it, role) for it in items]
        todo, seen = [], set()
        for i, k in enumerate(keys):
            if k not in self._cache and k not in seen:
                todo.append(i)
                seen.add(k)
        if todo:
            new = self.encoder.encode([items[i] for i in todo], role=role, batch_size=batch_size,
                                      show_progress=show_progress)
            for row, i in enumerate(todo):
                self._cache[keys[i]] = new[row]
                if keys[i][-1] is not None and keys[i][-1][0] == "id":
                    self._alive.append(items[i].image)  # keeps the id from being reused by another image
        if not items:
            return self.encoder.encode([], role=role, batch_size=batch_size, show_progress=False)
        return torch.stack([self._cache[k] for k in keys])


def rerank_topk(
    scores: Tensor,
    queries: Sequence[Item],
    candidate: Callable[[int, int], Item],
    reranker: SupportsRerank,
    k: int = 5,
) -> Tensor:
    """Re-order each row's top-``k`` columns by a reranker; the rest of the row keeps its embedding scores.

    The returned matrix ranks exactly as the two-stage pipeline does: the shortlist, in reranker order, above every
    other candidate, in embedder order. The shortlist's entries are set to ``row max + (k - new rank)`` (strictly
    above every other finite score of the row, no ties inside the shortlist), so any score-sorting consumer -- the
    metric code, the TREC run file and trec_eval -- sees the same order. Ties in reranker scores keep the
    embedder's order.

    Args:
        scores: (Nq, Nc) embedding scores; ``-inf`` marks padding (never shortlisted).
        queries: The Nq query items, row order.
        candidate: ``candidate(row, col) -> Item`` for a shortlisted column.
        reranker: Object with ``rerank(query, candidates) -> scores``.
        k: Shortlist size (paper: 5).

    Returns:
        A new (Nq, Nc) float tensor.
    """
    if k < 1:
        raise ValueError(f"rerank_k must be >= 1, got {k}")
    out = scores.clone().float()
    top = scores.float().topk(min(k, scores.shape[1]), dim=1)
    for row in range(scores.shape[0]):
        head = [(c, v) for c, v in zip(top.indices[row].tolist(), top.values[row].tolist()) if math.isfinite(v)]
        if not head:
            continue
        # topk does not promise an order among equal scores; sort so ties break by column index.
        head.sort(key=lambda cv: (-cv[1], cv[0]))
        cols = [c for c, _ in head]
        rs = torch.as_tensor(reranker.rerank(queries[row], [candidate(row, c) for c in cols]), dtype=torch.float64)
        if rs.numel() != len(cols):
            raise ValueError(f"reranker returned {rs.numel()} scores for {len(cols)} candidates")
        order = sorted(range(len(cols)), key=lambda j: -float(rs.flatten()[j]))  # stable: embedder order on ties
        top_score = float(scores[row, cols[0]])
        for new_rank, j in enumerate(order):
            out[row, cols[j]] = top_score + (len(cols) - new_rank)
    return out


def evaluate_two_stage(
    evaluate: Callable[..., BenchmarkResult],
    embedder: Encoder,
    reranker: SupportsRerank,
    out_dir: str | Path | None = None,
    rerank_k: int = 5,
    **kwargs: Any,
) -> tuple[BenchmarkResult, BenchmarkResult]:
    """Run a benchmark twice, embedder only ("E") and two-stage ("E+R"), embedding every item once.

    Args:
        evaluate: The runner, ``evaluate_mmeb`` or ``evaluate_visdoc``.
        embedder: The first stage (wrapped in a :class:`CachedEncoder` unless it is one).
        reranker: The second stage.
        out_dir: Files of the E run go to ``<out_dir>/E``, those of the E+R run to ``<out_dir>/E+R``.
        rerank_k: Shortlist size (paper: 5).
        **kwargs: The runner's other arguments (data, batch size, ...).

    Returns:
        ``(E result, E+R result)``.
    """
    cached = embedder if isinstance(embedder, CachedEncoder) else CachedEncoder(embedder)
    out = Path(out_dir) if out_dir is not None else None
    e = evaluate(cached, out_dir=out / "E" if out else None, reranker=None, **kwargs)
    er = evaluate(cached, out_dir=out / "E+R" if out else None, reranker=reranker, rerank_k=rerank_k, **kwargs)
    return e, er


# ----------------------------------------------------------------------------------------------------- files
def safe_filename(name: str) -> str:
    """A set name as a file name (path separators and odd characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._\-]+", "_", name).strip("._") or "set"


def write_trec_files(out_dir: Path, name: str, run: trec.Run, qrels: trec.Qrels, tag: str) -> tuple[str, str]:
    """Write ``runs/{name}.run`` and ``qrels/{name}.qrels``; returns their paths relative to ``out_dir``."""
    stem = safe_filename(name)
    run_rel, qrels_rel = f"runs/{stem}.run", f"qrels/{stem}.qrels"
    trec.write_run(out_dir / run_rel, run, tag=safe_filename(tag))
    trec.write_qrels(out_dir / qrels_rel, qrels)
    return run_rel, qrels_rel


def plot_scores(result: BenchmarkResult, path: Path) -> Path:
    """Bar chart of the per-set scores, grouped and coloured by group, OOD sets hatched, overall as a dashed line.

    Uses matplotlib's object API on an Agg canvas (no pyplot, no global backend switch, safe in training processes).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    groups = list(dict.fromkeys(s.group for s in result.sets.values()))
    sets = sorted(result.sets.values(), key=lambda s: groups.index(s.group))  # stable: data order within a group
    palette = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
    color = {g: palette[i % len(palette)] for i, g in enumerate(groups)}
    fig = Figure(figsize=(max(6.0, 0.45 * len(sets) + 2.0), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(sets)), [0.0 if math.isnan(s.score) else s.score for s in sets],
           color=[color[s.group] for s in sets], hatch=["//" if s.split == "ood" else "" for s in sets],
           edgecolor="white")
    ax.axhline(result.overall, color="black", linestyle="--", linewidth=1)
    handles = [Patch(color=color[g], label=f"{g} {v:.1f}") for g, v in result.groups.items()]
    handles.append(Patch(facecolor="none", edgecolor="black", linestyle="--", label=f"overall {result.overall:.1f}"))
    if any(s.split == "ood" for s in sets):
        handles.append(Patch(facecolor="grey", hatch="//", edgecolor="white", label="OOD set"))
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_xticks(range(len(sets)), [s.name for s in sets], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{result.metric} (x100)")
    ax.set_title(f"{result.benchmark.upper()} ({result.mode})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def scaled(metrics: Mapping[str, float | Tensor]) -> dict[str, float]:
    """Metric values in [0, 1] as reported numbers: x100, plain floats, rounded to 1e-6.

    The metrics are float32 means whose last digits are noise (16.666667 rather than 16.66666716337204).
    """
    return {k: round(float(v) * SCALE, 6) for k, v in metrics.items()}


def load_metrics(path: str | Path) -> dict[str, Any]:
    """Read a ``metrics.json`` written by a runner (or the folder holding it)."""
    path = Path(path)
    return json.loads((path / "metrics.json" if path.is_dir() else path).read_text(encoding="utf-8"))
