"""VisDoc evaluation: each query ranked against the whole corpus of its set, NDCG@5 (linear gain) and Recall@k.

The protocol of ViDoRe / VisRAG / ViDoSeek / MMLongBench as VLM2Vec-V2 runs them (paper Table 4): BEIR-layout sets
(queries, corpus of page images, qrels); queries and pages are embedded once, every query is scored against every
page (cosine similarity, in query chunks so a large corpus never needs the full score matrix at once), and the
set's score is the mean NDCG@5 x100 over queries with a relevant page. Collections (ViDoRe v1 / v2, VisRAG, OOD)
are means of their sets, ``overall`` the mean of all sets.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from mmembed.data.evalsets import VisDocSet, read_beir_visdoc
from mmembed.eval import metrics, trec
from mmembed.eval.results import (
    BenchmarkResult,
    Encoder,
    SetScore,
    SupportsRerank,
    Timer,
    rerank_topk,
    scaled,
    write_trec_files,
)
from mmembed.eval.suites import VISDOC_GROUP_TITLES, SetInfo, read_groups, resolve_info


class VisDocResult(BenchmarkResult):
    """Result of :func:`evaluate_visdoc`; ``groups`` are the collections (Table 4's VDRv1 / VDRv2 / VR / OOD)."""

    @property
    def collections(self) -> dict[str, float]:
        """Mean NDCG@k x100 per collection, keyed by display title where known (``ViDoRe v1``, ...)."""
        return {VISDOC_GROUP_TITLES.get(g, g): v for g, v in self.groups.items()}


def _is_beir(folder: Path) -> bool:
    return any((folder / p).exists() for p in ("queries.parquet", "queries"))


def resolve_visdoc_sets(data: Mapping[str, str | Path] | str | Path) -> tuple[dict[str, Path], dict[str, SetInfo]]:
    """Set name -> BEIR folder, and the grouping that ships with the data.

    Args:
        data: ``{name: folder}``; or a folder of BEIR set folders, optionally with ``sets.json`` (set -> split /
            group, as ``mmembed-data synth`` writes it); or one BEIR folder; or a synthetic-world root (its
            ``eval/visdoc`` is used).
    """
    if isinstance(data, Mapping):
        paths = {name: Path(p) for name, p in data.items()}
        parents = {p.parent for p in paths.values()}
        listing = next((f / "sets.json" for f in parents if (f / "sets.json").exists()), None)
        return paths, read_groups(listing) if listing else {}
    folder = Path(data)
    if (folder / "eval" / "visdoc").is_dir():
        folder = folder / "eval" / "visdoc"
    if _is_beir(folder):
        return {folder.name: folder}, {}
    listing = folder / "sets.json"
    if listing.exists():
        groups = read_groups(listing)
        return {name: folder / name for name in groups}, groups
    paths = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and _is_beir(p)}
    if not paths:
        raise FileNotFoundError(f"{folder} holds no sets.json and no BEIR set folders (queries/corpus/qrels)")
    return paths, {}


def score_visdoc_set(
    embedder: Encoder,
    data: VisDocSet,
    *,
    k: int = 5,
    batch_size: int = 16,
    reranker: SupportsRerank | None = None,
    rerank_k: int = 5,
    run_depth: int | None = 100,
    chunk_size: int = 1024,
    ties: metrics.Ties = "average",
    show_progress: bool | None = None,
) -> tuple[dict[str, float], trec.Run]:
    """Embed one set, rank every query against the whole corpus, and score it.

    Returns:
        ``(metrics x100, run)``: ``ndcg@k`` and ``recall@k`` means over queries with a relevant page, and the
        top-``run_depth`` pages per query (after E+R re-ordering when a reranker is given).
    """
    q = embedder.encode(data.queries, role="query", batch_size=batch_size, show_progress=show_progress)
    c = embedder.encode(data.corpus, role="candidate", batch_size=batch_size, show_progress=show_progress)
    ndcg, recall, run = [], [], {}
    for start in range(0, len(data.queries), chunk_size):
        ids = data.query_ids[start : start + chunk_size]
        scores: Tensor = q[start : start + chunk_size].float() @ c.float().T
        if reranker is not None:
            rows = data.queries[start : start + chunk_size]
            scores = rerank_topk(scores, rows, lambda r, j: data.corpus[j], reranker, rerank_k)
        rel = trec.dense_qrels(data.qrels, ids, data.corpus_ids)
        ndcg.append(metrics.ndcg_at_k(scores, rel, k, ties=ties, reduction="none"))
        recall.append(metrics.recall_at_k(scores, rel, k, ties=ties, reduction="none"))
        run.update(trec.scores_to_run(scores, ids, data.corpus_ids, k=run_depth or len(data.corpus_ids)))
    per_query = {f"ndcg@{k}": torch.cat(ndcg), f"recall@{k}": torch.cat(recall)}
    # Queries without a relevant page are NaN (not counted), as pytrec_eval leaves them out of the mean.
    values = {name: v[~v.isnan()].mean() if (~v.isnan()).any() else torch.tensor(float("nan"))
              for name, v in per_query.items()}
    main = per_query[f"ndcg@{k}"]
    main = main[~main.isnan()]
    # standard error of the mean NDCG over the judged queries (reported beside the score, not a metric of its own)
    values["stderr"] = main.std() / len(main) ** 0.5 if len(main) > 1 else torch.tensor(float("nan"))
    return scaled(values), run


def evaluate_visdoc(
    embedder: Encoder,
    sets: Mapping[str, str | Path] | str | Path,
    out_dir: str | Path | None = None,
    k: int = 5,
    *,
    batch_size: int = 16,
    ind_ood: Mapping[str, str] | None = None,
    groups: Mapping[str, SetInfo] | None = None,
    names: list[str] | None = None,
    reranker: SupportsRerank | None = None,
    rerank_k: int = 5,
    run_depth: int | None = 100,
    chunk_size: int = 1024,
    max_queries: int | None = None,
    image_dir: str | Path | None = None,
    ties: metrics.Ties = "average",
    show_progress: bool | None = None,
    extra: dict | None = None,
) -> VisDocResult:
    """Evaluate an embedder on BEIR-layout visual-document sets (paper Table 4 protocol).

    Args:
        embedder: An :class:`mmembed.Embedder` or anything with its ``encode``.
        sets: ``{name: BEIR folder}``, or a folder (see :func:`resolve_visdoc_sets`).
        out_dir: Where run / qrels files, ``metrics.json`` and ``scores.png`` go; ``None`` writes nothing.
        k: NDCG / recall cut-off (paper: 5).
        batch_size: Encoding batch size.
        ind_ood: ``{set: "ind" | "ood"}`` overrides.
        groups: ``{set: SetInfo}`` overrides for collection and split; by default from ``sets.json`` or, for public
            names, :data:`mmembed.eval.suites.VISDOC_GROUPS`.
        names: Evaluate only these sets (in this order).
        reranker: E+R mode: re-order each query's top-``rerank_k`` pages with it; ``None`` = E mode.
        rerank_k: Shortlist size for the reranker (paper: 5).
        run_depth: Pages per query written to the run file (``None``: the whole corpus).
        chunk_size: Queries scored against the corpus at once.
        max_queries: Evaluate only the first N queries of each set (the corpus stays whole).
        image_dir: Where page images stored as bytes are unpacked (default: ``images/`` in each set's folder).
        ties: Tie rule (see :mod:`mmembed.eval.metrics`).
        show_progress: Progress bars while encoding.
        extra: Context stored in ``metrics.json``.

    Returns:
        A :class:`VisDocResult` with per-set, per-collection, IND/OOD and overall NDCG@k, all x100.
    """
    paths, shipped = resolve_visdoc_sets(sets)
    if names is not None:
        unknown = [n for n in names if n not in paths]
        if unknown:
            raise ValueError(f"sets {unknown} are not in the data (have {sorted(paths)}); "
                             "fix --sets / names")
        paths = {n: paths[n] for n in names}
    info_table = {**shipped, **(groups or {})}
    out = Path(out_dir) if out_dir is not None else None
    mode = "E" if reranker is None else "E+R"
    result = VisDocResult("visdoc", f"ndcg@{k}", mode, out_dir=out, extra=dict(extra or {}))
    for name, folder in paths.items():
        with Timer() as t:
            data = read_beir_visdoc(folder, name=name,
                                    image_dir=Path(image_dir) / name if image_dir is not None else None)
            if max_queries is not None:
                data.query_ids, data.queries = data.query_ids[:max_queries], data.queries[:max_queries]
                data.qrels = {q: data.qrels[q] for q in data.query_ids}
            values, run = score_visdoc_set(embedder, data, k=k, batch_size=batch_size, reranker=reranker,
                                           rerank_k=rerank_k, run_depth=run_depth, chunk_size=chunk_size, ties=ties,
                                           show_progress=show_progress)
            run_file = qrels_file = None
            if out is not None:
                run_file, qrels_file = write_trec_files(out, name, run, data.qrels, tag=f"visdoc-{mode}")
        info = resolve_info(name, "visdoc", info_table, ind_ood)
        stderr = values.pop("stderr")
        result.sets[name] = SetScore(name, info.group, info.split, values[f"ndcg@{k}"], values, len(data.queries),
                                     len(data.corpus), run_file, qrels_file, round(t.seconds, 3), stderr=stderr)
    if out is not None:
        result.write()
    return result
