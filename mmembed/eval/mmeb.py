"""MMEB image evaluation: each query ranked against its *own* candidates, Precision@1, per subset / meta-task / split.

The protocol of MMEB (VLM2Vec) as used in the paper's Table 3: a subset is a parquet file whose rows are queries, each
with its own candidate list whose first entry is the ground truth. Queries and candidates are embedded once per
subset (duplicates pooled by :func:`mmembed.data.evalsets.read_mmeb`), every row's query is scored against its
candidates by cosine similarity (embeddings are L2-normalised), and the subset's score is Precision@1 (= hit@1) x100.

Ties. Within a row a candidate listed twice is the same input and is counted once (so a distractor identical to the
ground truth is the ground truth, as VLM2Vec's ``argmax == 0`` rule also decides). Exact ties between *different*
candidates only happen with a degenerate model; ``ties="average"`` (default) then counts a tied top as 1/t, so a
collapsed model scores chance level instead of 100 (``ties="index"`` is VLM2Vec's rule). See
:mod:`mmembed.eval.metrics`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from mmembed.data.evalsets import MMEBSubset, read_mmeb
from mmembed.eval import metrics
from mmembed.eval.results import (
    BenchmarkResult,
    Encoder,
    SetScore,
    SupportsRerank,
    Timer,
    binomial_stderr,
    rerank_topk,
    scaled,
    write_trec_files,
)
from mmembed.eval.suites import SetInfo, read_groups, resolve_info
from mmembed.types import Item

_MAX_BLOCK = 1 << 22  # floats per (rows x unique candidates) block: bounds memory on 1000-candidate subsets


class MMEBResult(BenchmarkResult):
    """Result of :func:`evaluate_mmeb`; ``groups`` are the meta-tasks (Table 3's per-meta-task columns)."""

    @property
    def meta_tasks(self) -> dict[str, float]:
        """Mean Precision@1 x100 per meta-task."""
        return self.groups

    @property
    def ind(self) -> float | None:
        return self.splits.get("ind")

    @property
    def ood(self) -> float | None:
        return self.splits.get("ood")


def resolve_mmeb_subsets(
    data: Mapping[str, str | Path] | str | Path,
) -> tuple[dict[str, Path], dict[str, SetInfo], dict[str, dict]]:
    """Subset name -> parquet path, the grouping that ships with the data, and its raw per-subset metadata.

    Args:
        data: ``{name: parquet}``; or a folder holding ``{name}.parquet`` files and optionally ``subsets.json``
            (subset -> meta_task / split / query_kind / candidate_kind, as ``mmembed-data synth`` writes it); or a
            synthetic-world root (its ``eval/mmeb`` is used); or the hub layout, one folder per subset holding
            ``{split}-00000-of-0000N.parquet`` shards (the root, or one subset folder). Hub-layout subsets are
            named after their folder, so grouping comes from the public lists in ``mmembed.eval.suites``.

    Returns:
        ``(paths, groups, meta)``; ``groups`` and ``meta`` are empty without a ``subsets.json``.
    """
    if isinstance(data, Mapping):
        paths = {name: Path(p) for name, p in data.items()}
        folders = {p.parent for p in paths.values()}
        listing = next((f / "subsets.json" for f in folders if (f / "subsets.json").exists()), None)
    else:
        folder = Path(data)
        if (folder / "eval" / "mmeb").is_dir():
            folder = folder / "eval" / "mmeb"
        listing = folder / "subsets.json" if (folder / "subsets.json").exists() else None
        if listing is not None:
            names = json.loads(listing.read_text(encoding="utf-8"))
            paths = {n: folder / f"{n}.parquet" if (folder / f"{n}.parquet").exists() else folder / n for n in names}
        else:
            paths = _hub_or_flat_subsets(folder)
        if not paths:
            raise FileNotFoundError(f"{folder} holds no subsets.json, no *.parquet files and no subset folders of "
                                    "parquet shards; point at MMEB subsets")
    if listing is None:
        return paths, {}, {}
    return paths, read_groups(listing), json.loads(listing.read_text(encoding="utf-8"))


# Shard names of datasets pushed with `push_to_hub`: {split}-00000-of-00001.parquet.
_HUB_SHARD = re.compile(r"^[\w.]+-\d{5}-of-\d{5}$")


def _hub_or_flat_subsets(folder: Path) -> dict[str, Path]:
    """``{name}.parquet`` files; else one subset folder of hub shards; else subfolders that hold parquet shards."""
    files = sorted(folder.glob("*.parquet"))
    if files and all(_HUB_SHARD.match(f.stem) for f in files):
        return {folder.name: folder}  # one subset in the hub layout: its name is the folder's
    if files:
        return {f.stem: f for f in files}
    return {d.name: d for d in sorted(folder.iterdir()) if d.is_dir() and any(d.glob("*.parquet"))}


def _default_image_root(parquet: Path) -> Path:
    folder = parquet.parent
    return folder / "images" if (folder / "images").is_dir() else folder


def row_scores(queries: Tensor, candidates: Tensor, subset: MMEBSubset) -> tuple[Tensor, Tensor]:
    """Score every row's query against its own candidates.

    Args:
        queries: (unique queries, D) embeddings.
        candidates: (unique candidates, D) embeddings.
        subset: The rows (query index, candidate indices with the ground truth first).

    Returns:
        ``(scores, columns)``, both (rows, longest list): ``scores[r, j]`` is the similarity of row r's query with
        its j-th distinct candidate, ``columns[r, j]`` that candidate's index into ``subset.candidates``; padding is
        ``-inf`` / ``-1``. Column 0 is the ground truth.
    """
    lists = [list(dict.fromkeys(r.candidates)) for r in subset.rows]  # a candidate listed twice counts once
    width = max(len(c) for c in lists)
    columns = torch.full((len(lists), width), -1, dtype=torch.long)
    for i, c in enumerate(lists):
        columns[i, : len(c)] = torch.as_tensor(c)
    qidx = torch.as_tensor([r.query for r in subset.rows], dtype=torch.long)
    scores = torch.full(columns.shape, float("-inf"))
    step = max(1, _MAX_BLOCK // max(1, candidates.shape[0]))
    for start in range(0, len(lists), step):
        sl = slice(start, start + step)
        block = queries[qidx[sl]].float() @ candidates.float().T  # (rows, unique candidates)
        cols = columns[sl]
        picked = block.gather(1, cols.clamp(min=0))
        scores[sl] = torch.where(cols >= 0, picked, torch.full_like(picked, float("-inf")))
    return scores, columns


def _run_and_qrels(scores: Tensor, columns: Tensor, depth: int | None) -> tuple[dict, dict]:
    """TREC run (top-``depth`` distinct candidates per row) and qrels (the ground truth) of a subset."""
    run, qrels = {}, {}
    for r in range(scores.shape[0]):
        qid = f"q{r:06d}"
        valid = columns[r] >= 0
        s, c = scores[r][valid], columns[r][valid]
        top = s.topk(min(depth or len(s), len(s)))
        run[qid] = {f"c{int(c[j])}": float(v) for v, j in zip(top.values.tolist(), top.indices.tolist())}
        qrels[qid] = {f"c{int(columns[r, 0])}": 1}
    return run, qrels


def evaluate_subset(
    embedder: Encoder,
    subset: MMEBSubset,
    *,
    batch_size: int = 16,
    reranker: SupportsRerank | None = None,
    rerank_k: int = 5,
    ties: metrics.Ties = "average",
    show_progress: bool | None = None,
) -> tuple[dict[str, float], Tensor, Tensor]:
    """Embed one subset and score it.

    Returns:
        ``(metrics x100, scores, columns)`` with ``scores`` / ``columns`` as in :func:`row_scores`, after E+R
        re-ordering when a reranker is given.
    """
    if not subset.rows:
        raise ValueError(f"MMEB subset {subset.name!r} has no rows to evaluate")
    q = embedder.encode(subset.queries, role="query", batch_size=batch_size, show_progress=show_progress)
    c = embedder.encode(subset.candidates, role="candidate", batch_size=batch_size, show_progress=show_progress)
    scores, columns = row_scores(q, c, subset)
    if reranker is not None:
        row_queries: list[Item] = [subset.queries[r.query] for r in subset.rows]
        scores = rerank_topk(scores, row_queries, lambda r, j: subset.candidates[int(columns[r, j])], reranker,
                             rerank_k)
    judged = torch.zeros_like(scores)
    judged[:, 0] = 1.0
    finite = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, torch.finfo(torch.float32).min))
    values = {
        "precision@1": metrics.precision_at_1(scores, 0, ties=ties),
        "recall@5": metrics.recall_at_k(finite, judged, 5, ties=ties),
    }
    return scaled(values), scores, columns


def evaluate_mmeb(
    embedder: Encoder,
    subsets: Mapping[str, str | Path] | str | Path,
    image_root: str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    version: str = "v2",
    batch_size: int = 16,
    ind_ood: Mapping[str, str] | None = None,
    groups: Mapping[str, SetInfo] | None = None,
    names: list[str] | None = None,
    reranker: SupportsRerank | None = None,
    rerank_k: int = 5,
    run_depth: int | None = 100,
    max_queries: int | None = None,
    ties: metrics.Ties = "average",
    show_progress: bool | None = None,
    extra: dict | None = None,
    instructions: str = "paper",
) -> MMEBResult:
    """Evaluate an embedder on MMEB-format subsets (paper Table 3 protocol).

    Args:
        embedder: An :class:`mmembed.Embedder` or anything with its ``encode``.
        subsets: ``{name: parquet path}``, or a folder (see :func:`resolve_mmeb_subsets`).
        image_root: Folder the image paths are relative to; default ``<parquet folder>/images`` when it exists,
            else the parquet's folder.
        out_dir: Where run / qrels files, ``metrics.json`` and ``scores.png`` go; ``None`` writes nothing.
        version: ``"v2"`` or ``"v1"`` parquet columns.
        batch_size: Encoding batch size.
        ind_ood: ``{subset: "ind" | "ood"}`` overrides; by default the split comes from ``subsets.json`` or, for
            public names, :data:`mmembed.eval.suites.MMEB_OOD`.
        groups: ``{subset: SetInfo}`` overrides for meta-task and split.
        names: Evaluate only these subsets (in this order).
        reranker: E+R mode: re-order each row's top-``rerank_k`` candidates with it; ``None`` = E mode.
        rerank_k: Shortlist size for the reranker (paper: 5).
        run_depth: Candidates per query written to the run file (``None``: all).
        max_queries: Evaluate only the first N rows of each subset (quick in-training checks).
        ties: Tie rule for Precision@1 (see module docstring).
        show_progress: Progress bars while encoding (default: on long inputs).
        extra: Context stored in ``metrics.json``.
        instructions: ``"paper"`` (Tables 11-12, as in training; default) or ``"file"`` (the parquet's own); see
            :func:`mmembed.data.evalsets.read_mmeb`.

    Returns:
        An :class:`MMEBResult` with per-subset, per-meta-task, IND/OOD and overall Precision@1, all x100.
    """
    paths, shipped, meta = resolve_mmeb_subsets(subsets)
    if names is not None:
        unknown = [n for n in names if n not in paths]
        if unknown:
            raise ValueError(f"subsets {unknown} are not in the data (have {sorted(paths)}); "
                             "fix --subsets / names")
        paths = {n: paths[n] for n in names}
    info_table = {**shipped, **(groups or {})}
    out = Path(out_dir) if out_dir is not None else None
    result = MMEBResult("mmeb", "precision@1", "E" if reranker is None else "E+R", out_dir=out,
                        extra={"instructions": instructions, **(extra or {})})
    for name, path in paths.items():
        with Timer() as t:
            root = Path(image_root) if image_root is not None else _default_image_root(path)
            kinds = {k: meta.get(name, {}).get(k) for k in ("query_kind", "candidate_kind")}
            subset = read_mmeb(path, root, version, name=name, instructions=instructions, **kinds)
            if max_queries is not None:
                subset.rows = subset.rows[:max_queries]
                _prune(subset)
            values, scores, columns = evaluate_subset(embedder, subset, batch_size=batch_size, reranker=reranker,
                                                      rerank_k=rerank_k, ties=ties, show_progress=show_progress)
            run_file = qrels_file = None
            if out is not None:
                run, qrels = _run_and_qrels(scores, columns, run_depth)
                run_file, qrels_file = write_trec_files(out, name, run, qrels, tag=f"mmeb-{result.mode}")
        info = resolve_info(name, "mmeb", info_table, ind_ood)
        result.sets[name] = SetScore(name, info.group, info.split, values["precision@1"], values, len(subset.rows),
                                     len(subset.candidates), run_file, qrels_file, round(t.seconds, 3),
                                     stderr=binomial_stderr(values["precision@1"], len(subset.rows)))
    if out is not None:
        result.write()
    return result


def _prune(subset: MMEBSubset) -> None:
    """Drop queries / candidates no kept row refers to (so ``max_queries`` also shortens the embedding)."""
    qmap = {old: new for new, old in enumerate(sorted({r.query for r in subset.rows}))}
    cmap = {old: new for new, old in enumerate(sorted({c for r in subset.rows for c in r.candidates}))}
    subset.queries = [subset.queries[i] for i in qmap]
    subset.candidates = [subset.candidates[i] for i in cmap]
    for r in subset.rows:
        r.query, r.candidates = qmap[r.query], [cmap[c] for c in r.candidates]
