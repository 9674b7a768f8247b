"""Converters from real training formats to mmembed shards (:mod:`mmembed.data.schema`), and a LLaVA validator.

* :func:`mmeb_train_to_shards` -- MMEB-train parquet (``qry, qry_image_path, pos_text, pos_image_path[, neg_text,
  neg_image_path]``, legacy ``<|image_1|>`` placeholders and instructions fused into the text).
* :func:`visdoc_beir_to_shards` -- BEIR-layout VisDoc sets (queries / corpus / qrels), one sample per relevant page.
* :func:`visdoc_pairs_to_shards` -- ColPali/VisRAG-style (query, page image) pairs in one parquet.
* :func:`jsonl_to_shards` -- generic JSON lines ``{"query": {...}, "positive": {...}, "negatives": [...], ...}``.
* :func:`normalize_llava` -- checks and normalises LLaVA-style instruction JSON for stage 1.

Instructions come from the paper's Tables 11-12 by dataset name (:func:`resolve_instructions`), and explicit
arguments override them. Images are stored as the source bytes (never re-encoded). Rows that cannot be used are
counted by reason in the returned report, never dropped silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mmembed.data.convert_common import (  # noqa: F401  (re-exported: the converters' public helpers)
    ConvertReport,
    Row,
    _as_list,
    _Builder,
    _check_task,
    _guard,
    _write,
    image_ext,
    read_image_file,
    resolve_instructions,
)
from mmembed.data.evalsets import find_beir_part, hub_splits, image_cell, read_parquet, split_legacy_text
from mmembed.data.jsonl import jsonl_to_shards  # noqa: F401  (re-exported)
from mmembed.data.llava import LlavaReport, normalize_llava  # noqa: F401  (re-exported)
from mmembed.data.schema import Sample
from mmembed.data.skips import SkipSample

#: MMEB-train subsets: name -> (task, meta_task). Names as in the TIGER-Lab/MMEB-train repository.
MMEB_TRAIN_SUBSETS: dict[str, tuple[str, str]] = {
    "ImageNet_1K": ("i2t", "classification"),
    "N24News": ("it2t", "classification"),
    "HatefulMemes": ("i2t", "classification"),
    "VOC2007": ("i2t", "classification"),
    "SUN397": ("i2t", "classification"),
    "OK-VQA": ("it2t", "vqa"),
    "A-OKVQA": ("it2t", "vqa"),
    "DocVQA": ("it2t", "vqa"),
    "InfographicsVQA": ("it2t", "vqa"),
    "ChartQA": ("it2t", "vqa"),
    "Visual7W": ("it2t", "vqa"),
    "VisDial": ("t2i", "retrieval"),
    "CIRR": ("it2i", "retrieval"),
    "VisualNews_t2i": ("t2i", "retrieval"),
    "VisualNews_i2t": ("i2t", "retrieval"),
    "MSCOCO_t2i": ("t2i", "retrieval"),
    "MSCOCO_i2t": ("i2t", "retrieval"),
    "NIGHTS": ("i2i", "retrieval"),
    "WebQA": ("t2it", "retrieval"),
    "MSCOCO": ("it2i", "grounding"),
}
#: MMEB-train subsets whose query images are documents (tiled like pages).
DOCUMENT_QUERY_SUBSETS = frozenset({"DocVQA", "InfographicsVQA", "ChartQA"})



# ----------------------------------------------------------------------------------------------------- MMEB-train
def mmeb_train_to_shards(
    parquet: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    dataset: str | None = None,
    *,
    task: str | None = None,
    meta_task: str | None = None,
    query_instruction: str | None = None,
    target_instruction: str | None = None,
    query_kind: str | None = None,
    candidate_kind: str = "natural",
    maxcount: int = 1000,
    limit: int | None = None,
    progress: bool = False,
    split: str | None = "original",
) -> ConvertReport:
    """Convert one MMEB-train subset to shards.

    The fused legacy strings are split (:func:`mmembed.data.evalsets.split_legacy_text`): the content becomes the
    side's text and the source instruction is replaced by the paper's (or the given) instruction.

    Args:
        parquet: The subset's parquet file or its folder (Hugging Face layout: ``{subset}/*.parquet``).
        image_root: Folder the ``*_image_path`` columns are relative to.
        out_dir: Where ``{dataset}-%06d.tar`` shards go.
        dataset: Subset name (default: the folder name, or the file stem); decides task, meta-task, instructions.
        task / meta_task: Override (required for subsets not in :data:`MMEB_TRAIN_SUBSETS`).
        query_kind: ``natural``/``document`` (default: document for DocVQA, InfographicsVQA, ChartQA).
        limit: Convert only the first ``limit`` rows.
        split: For a hub-layout folder (``{subset}/original-*.parquet`` next to ``diverse_instruction-*.parquet``),
            which split to read; both hold the same pairs with other source instructions, which are replaced by
            the paper's anyway. Ignored for a single file or a folder without hub shard names.
    """
    path = Path(parquet)
    dataset = dataset or (path.name if path.is_dir() else path.stem)
    known_task, known_meta = MMEB_TRAIN_SUBSETS.get(dataset, (None, None))
    task, meta_task = _check_task(
        dataset, task or known_task, meta_task or known_meta,
        f"pass --dataset with an MMEB-train subset name ({', '.join(MMEB_TRAIN_SUBSETS)}) or --task and --meta-task",
    )
    q_inst, t_inst = resolve_instructions(dataset, task, query_instruction, target_instruction)
    q_kind = query_kind or ("document" if dataset in DOCUMENT_QUERY_SUBSETS else "natural")
    shards = hub_splits(sorted(path.rglob("*.parquet"))) if path.is_dir() else {}
    table = read_parquet(path, "MMEB-train", split=split if shards else None)
    needed = ["qry", "qry_image_path", "pos_text", "pos_image_path"]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing MMEB-train column(s) {missing} (has {table.column_names}); "
                         "is this an MMEB eval file? use read_mmeb for those")
    if limit is not None:
        table = table.slice(0, limit)
    cols = needed + [c for c in ("neg_text", "neg_image_path") if c in table.column_names]
    root = Path(image_root)

    def image(rel: Any) -> tuple[bytes, str] | None:
        rel = (rel or "").strip() if isinstance(rel, str) else rel
        return read_image_file(root / rel) if rel else None

    def build(i: int, rec: dict[str, Any]) -> tuple[Sample, dict[str, bytes]]:
        b = _Builder(f"{dataset}/{i:08d}", dataset, task, meta_task)
        query = b.side("query", split_legacy_text(rec["qry"])[1], image(rec["qry_image_path"]), q_inst, q_kind)
        pos = b.side("pos", split_legacy_text(rec["pos_text"])[1], image(rec["pos_image_path"]), t_inst, candidate_kind)
        texts, paths = _as_list(rec.get("neg_text")), _as_list(rec.get("neg_image_path"))
        negs = []
        for j in range(max(len(texts), len(paths))):
            text = split_legacy_text(texts[j])[1] if j < len(texts) else None
            img = image(paths[j]) if j < len(paths) else None
            if text is None and img is None:
                continue  # MMEB-train writes '' for "no negative"
            negs.append(b.side(f"neg{len(negs)}", text, img, t_inst, candidate_kind))
        return b.build(query, pos, negs, {"source": f"{path.name}#{i}"})

    def rows() -> Iterator[Row]:
        i = 0
        for batch in table.select(cols).to_batches(max_chunksize=1024):
            for rec in batch.to_pylist():
                yield _guard(lambda rec=rec, i=i: build(i, rec))
                i += 1

    return _write(rows(), dataset, out_dir, maxcount, table.num_rows, progress)


# ---------------------------------------------------------------------------------------------------------- VisDoc
def _page_bytes(value: Any, image_root: Path | None) -> tuple[bytes, str]:
    """Bytes + extension of a page cell: HF Image struct (bytes/path), raw bytes, or a path string."""
    data, rel = image_cell(value)
    if data:
        return data, image_ext(data)
    if rel:
        p = Path(rel)
        return read_image_file(p if p.is_absolute() or image_root is None else image_root / p)
    raise SkipSample("missing_image", "page cell holds neither bytes nor a path")


def visdoc_beir_to_shards(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    dataset: str,
    *,
    query_instruction: str | None = None,
    target_instruction: str | None = None,
    min_score: int = 1,
    image_root: str | os.PathLike | None = None,
    maxcount: int = 1000,
    progress: bool = False,
) -> ConvertReport:
    """Convert a BEIR-layout VisDoc training set to t2vd shards: one sample per (query, page with score >= min_score).

    The corpus is streamed in record batches, so page images are never all in memory.

    Args:
        folder: Holds ``queries``, ``corpus`` and ``qrels`` (``.parquet`` files or Hugging Face folders).
        dataset: Name for shards and instructions (e.g. ``"VisRAG"``, ``"Colpali"``).
        image_root: Base for corpus image paths given as relative strings (default: ``folder``).
    """
    folder = Path(folder)
    q_inst, t_inst = resolve_instructions(dataset, "t2vd", query_instruction, target_instruction)
    queries = {str(r["query-id"]): r["query"] for r in read_parquet(find_beir_part(folder, "queries"), "queries")
               .select(["query-id", "query"]).to_pylist()}
    wanted: dict[str, list[str]] = {}
    qrels = read_parquet(find_beir_part(folder, "qrels"), "qrels").select(["query-id", "corpus-id", "score"])
    for r in qrels.to_pylist():
        if r["score"] is not None and r["score"] >= min_score:
            wanted.setdefault(str(r["corpus-id"]), []).append(str(r["query-id"]))
    corpus_part = find_beir_part(folder, "corpus")
    files = sorted(corpus_part.rglob("*.parquet")) if corpus_part.is_dir() else [corpus_part]
    total = sum(len(v) for v in wanted.values())
    root = Path(image_root) if image_root is not None else folder

    def rows() -> Iterator[Row]:
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=["corpus-id", "image"]):
                for rec in batch.to_pylist():
                    cid = str(rec["corpus-id"])
                    for qid in wanted.get(cid, ()):
                        yield _guard(lambda rec=rec, cid=cid, qid=qid: pair(qid, cid, rec["image"]))

    def pair(qid: str, cid: str, cell: Any) -> tuple[Sample, dict[str, bytes]]:
        if qid not in queries:
            raise SkipSample("bad_json", f"qrels name query {qid!r} that is not in queries")
        b = _Builder(f"{dataset}/{qid}/{cid}", dataset, "t2vd", "visdoc")
        query = b.side("query", str(queries[qid] or ""), None, q_inst, "natural", f"{dataset}/q/{qid}")
        page = b.side("pos", None, _page_bytes(cell, root), t_inst, "document", f"{dataset}/c/{cid}")
        return b.build(query, page, [], {"query_id": qid, "corpus_id": cid})

    return _write(rows(), dataset, out_dir, maxcount, total, progress)


def visdoc_pairs_to_shards(
    parquet: str | os.PathLike,
    out_dir: str | os.PathLike,
    dataset: str,
    *,
    query_column: str = "query",
    image_column: str = "image",
    image_root: str | os.PathLike | None = None,
    query_instruction: str | None = None,
    target_instruction: str | None = None,
    maxcount: int = 1000,
    limit: int | None = None,
    progress: bool = False,
    split: str | None = None,
) -> ConvertReport:
    """Convert ColPali/VisRAG-style (query, page image) pairs to t2vd shards.

    Args:
        parquet: A parquet file or a folder of them (the hub layout: ``data/train-00000-of-000NN.parquet``, as the
            ColPali and VisRAG training sets ship).
        image_column: HF Image struct, raw bytes, or a path (relative to ``image_root``).
        split: In a folder holding shards of several splits (``train-*`` and ``test-*``), read this one; a folder
            with several splits and no choice is an error rather than a silent mix.
    """
    path = Path(parquet)
    q_inst, t_inst = resolve_instructions(dataset, "t2vd", query_instruction, target_instruction)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"{path}: no parquet files; point to the pairs parquet file or its folder")
    splits = hub_splits(files) if path.is_dir() else {}
    if split is not None and splits:
        if split not in splits:
            raise FileNotFoundError(f"{path} has no '{split}-*.parquet' shards (splits there: {sorted(splits)})")
        files = splits[split]
    elif len(splits) > 1:
        raise ValueError(f"{path} holds shards of several splits {sorted(splits)}; choose one with --split")
    names = pq.ParquetFile(files[0]).schema_arrow.names
    missing = [c for c in (query_column, image_column) if c not in names]
    if missing:
        raise ValueError(f"{files[0]}: missing column(s) {missing} (has {names}); set --query-column/--image-column")
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if limit is not None:
        total = min(total, limit)

    def pair(i: int, rec: dict[str, Any]) -> tuple[Sample, dict[str, bytes]]:
        b = _Builder(f"{dataset}/{i:08d}", dataset, "t2vd", "visdoc")
        query = b.side("query", (rec[query_column] or "").strip(), None, q_inst, "natural")
        page = b.side("pos", None, _page_bytes(rec[image_column], root), t_inst, "document")
        return b.build(query, page, [], {"source": f"{path.name}#{i}"})

    def rows() -> Iterator[Row]:
        i = 0
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=[query_column, image_column]):
                for rec in batch.to_pylist():
                    if limit is not None and i >= limit:
                        return
                    yield _guard(lambda rec=rec, i=i: pair(i, rec))
                    i += 1

    return _write(rows(), dataset, out_dir, maxcount, total, progress)
