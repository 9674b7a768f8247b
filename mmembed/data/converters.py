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

import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from mmembed.data.evalsets import find_beir_part, hub_splits, image_cell, read_parquet, split_legacy_text
from mmembed.data.schema import META_TASKS, TASKS, Sample, SchemaError, Side
from mmembed.data.skips import SkipCounter, SkipSample
from mmembed.data.writing import write_shards

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

_PIL_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "MPO": "jpg"}


@dataclass
class ConvertReport:
    """What a conversion wrote and what it skipped (by reason)."""

    dataset: str
    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.dataset}: wrote {self.written} samples to {len(self.shards)} shards; skipped: {skipped}"


def resolve_instructions(
    dataset: str, task: str | None = None, query_instruction: str | None = None, target_instruction: str | None = None
) -> tuple[str, str]:
    """The (query, target) instructions for a dataset: the paper's Tables 11-12, overridden by explicit arguments.

    Raises:
        ValueError: The dataset is not in the tables and not both instructions were given.
    """
    if query_instruction is not None and target_instruction is not None:
        return query_instruction, target_instruction
    from mmembed.backbone.templates import instructions_for  # lazy: keeps the backbone out of data-only imports

    try:
        query, target = instructions_for(dataset, task)
    except KeyError as exn:
        raise ValueError(
            f"dataset {dataset!r} is not in the paper's instruction tables; pass --query-instruction and "
            "--target-instruction (query_instruction=/target_instruction=)"
        ) from exn
    return query_instruction or query, target_instruction or target


def image_ext(data: bytes) -> str:
    """The member extension for encoded image bytes, read from the header (``png``, ``jpg``, ...).

    Raises:
        SkipSample: ``corrupt_image`` when PIL does not recognise the bytes.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except Exception as exn:  # noqa: BLE001 -- any failure to identify the header means an unusable image
        raise SkipSample("corrupt_image", repr(exn)) from exn
    return _PIL_EXT.get(fmt or "", (fmt or "img").lower())


def read_image_file(path: str | os.PathLike) -> tuple[bytes, str]:
    """Bytes and member extension of an image file.

    Raises:
        SkipSample: ``missing_image`` or ``corrupt_image``.
    """
    path = Path(path)
    if not path.is_file():
        raise SkipSample("missing_image", str(path))
    data = path.read_bytes()
    return data, image_ext(data)


class _Builder:
    """Assembles one Sample and its image members."""

    def __init__(self, sample_id: str, dataset: str, task: str, meta_task: str) -> None:
        self.id, self.dataset, self.task, self.meta_task = sample_id, dataset, task, meta_task
        self.images: dict[str, bytes] = {}

    def side(
        self, role: str, text: str | None, image: tuple[bytes, str] | None, instruction: str | None, kind: str,
        side_id: str | None = None,
    ) -> Side:
        member = None
        if image is not None:
            member = f"{role}.{image[1]}"
            self.images[member] = image[0]
        try:
            side = Side(text=text or None, image=member, instruction=instruction, kind=kind, id=side_id)
        except SchemaError as exn:  # counted under the reason the shard reader would give it
            raise SkipSample(exn.reason, f"{self.id}: {role}: {exn}") from None
        if side.is_empty:
            raise SkipSample("empty_side", f"{self.id}: {role} has neither text nor image")
        return side

    def build(self, query: Side, positive: Side, negatives: list[Side], meta: dict[str, Any]) -> tuple[Sample, dict]:
        try:
            sample = Sample(id=self.id, dataset=self.dataset, task=self.task, meta_task=self.meta_task, query=query,
                            positive=positive, negatives=negatives, meta=meta)
        except SchemaError as exn:
            raise SkipSample(exn.reason, f"{self.id}: {exn}") from None
        return sample, self.images


Row = tuple[Sample, dict[str, bytes]] | SkipSample


def _write(
    rows: Iterable[Row], dataset: str, out_dir: str | os.PathLike, maxcount: int, total: int | None, progress: bool
) -> ConvertReport:
    """Write built rows to ``out_dir/{dataset}-%06d.tar``, counting SkipSample rows; returns the report."""
    counter = SkipCounter(f"convert:{dataset}", log_first=5)
    report = ConvertReport(dataset)
    from rich.progress import Progress

    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"convert {dataset}", total=total)

        def good() -> Iterator[tuple[Sample, dict[str, bytes]]]:
            for row in rows:
                if isinstance(row, SkipSample):
                    counter.add(row.reason, detail=row.detail)
                    bar.advance(task)
                    continue
                yield row

        def done(_: Sample) -> None:
            report.written += 1
            bar.advance(task)

        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", dataset)
        report.shards = write_shards(good(), str(Path(out_dir) / f"{safe}-%06d.tar"), maxcount, on_sample=done)
    report.skipped = counter.as_dict()
    return report


def _guard(fn: Callable[[], tuple[Sample, dict[str, bytes]]]) -> Row:
    try:
        return fn()
    except SkipSample as skip:
        return skip


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [value]
    return list(value)


def _check_task(dataset: str, task: str | None, meta_task: str | None, option: str) -> tuple[str, str]:
    if task is None or meta_task is None:
        raise ValueError(f"dataset {dataset!r} has no known task/meta-task; {option}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    if meta_task not in META_TASKS:
        raise ValueError(f"unknown meta-task {meta_task!r}; use one of {META_TASKS}")
    return task, meta_task


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


# ------------------------------------------------------------------------------------------------------ JSON lines
def _infer_task(query: Mapping[str, Any], positive: Mapping[str, Any]) -> str:
    def modality(side: Mapping[str, Any]) -> str:
        return ("i" if side.get("image") else "") + ("t" if side.get("text") else "")

    q, c = modality(query), modality(positive)
    if q == "t" and c == "i" and positive.get("kind") == "document":
        return "t2vd"
    task = f"{q}2{c}"
    if task not in TASKS:
        raise SkipSample("bad_json", f"cannot infer a task from query {q or 'empty'} -> candidate {c or 'empty'}")
    return task


def jsonl_to_shards(
    jsonl: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dataset: str | None = None,
    task: str | None = None,
    meta_task: str | None = None,
    query_instruction: str | None = None,
    target_instruction: str | None = None,
    maxcount: int = 1000,
    progress: bool = False,
) -> list[ConvertReport]:
    """Convert generic JSON lines to shards, one shard set per dataset.

    Each line: ``{"query": {"text", "image", "instruction"?, "kind"?}, "positive": {...}, "negatives": [...],
    "dataset"?, "task"?, "meta_task"?, "id"?}``; a side may also be a plain string (its text). Image paths are
    relative to ``image_root``. Arguments fill what a line leaves out (``dataset``, ``meta_task``) and override
    instructions; the task defaults to the modalities (``t2i``, ``it2t``, ``t2vd`` for a document positive...).
    Instruction precedence: argument > the side's ``instruction`` > the paper's table for the dataset.

    Raises:
        ValueError: A dataset without instructions or meta-task (naming the option to pass).
    """
    path, root = Path(jsonl), Path(image_root)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the JSON-lines file")
    by_dataset: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    parse = SkipCounter(f"jsonl:{path.name}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "query" not in rec or "positive" not in rec:
                    raise ValueError("needs 'query' and 'positive'")
            except ValueError as exn:
                parse.add("bad_json", where=f"line {lineno}", detail=str(exn))
                continue
            name = rec.get("dataset") or dataset
            if not name:
                raise ValueError(f"{path} line {lineno}: no 'dataset'; add it to the line or pass --dataset")
            by_dataset.setdefault(name, []).append((lineno, rec))

    def side_dict(value: Any) -> dict[str, Any]:
        return {"text": value} if isinstance(value, str) else dict(value or {})

    reports = []
    for name, records in by_dataset.items():
        ds_meta = meta_task or next((r.get("meta_task") for _, r in records if r.get("meta_task")), None)
        if ds_meta is None:
            raise ValueError(
                f"dataset {name!r} in {path}: no meta_task; add \"meta_task\" to its lines or pass --meta-task"
            )
        if ds_meta not in META_TASKS:
            raise ValueError(f"dataset {name!r}: unknown meta_task {ds_meta!r}; use one of {META_TASKS}")
        need_table = any(
            not side_dict(r["query"]).get("instruction") or not side_dict(r["positive"]).get("instruction")
            for _, r in records
        )
        table_q = table_t = None
        if need_table and (query_instruction is None or target_instruction is None):
            table_q, table_t = resolve_instructions(name, task, query_instruction, target_instruction)

        def build(lineno: int, rec: dict[str, Any], name: str = name, ds_meta: str = ds_meta,
                  table_q: str | None = table_q, table_t: str | None = table_t) -> tuple[Sample, dict[str, bytes]]:
            q, p = side_dict(rec["query"]), side_dict(rec["positive"])
            negs = [side_dict(n) for n in rec.get("negatives") or []]
            t = rec.get("task") or task or _infer_task(q, p)
            if t not in TASKS:
                raise SkipSample("bad_json", f"line {lineno}: unknown task {t!r}")
            b = _Builder(str(rec.get("id") or f"{name}/{lineno:08d}"), name, t, rec.get("meta_task") or ds_meta)

            def make(role: str, s: dict[str, Any], default: str | None, override: str | None) -> Side:
                img = read_image_file(root / s["image"]) if s.get("image") else None
                kind = s.get("kind") or "natural"
                if kind not in ("natural", "document"):
                    raise SkipSample("bad_json", f"line {lineno}: {role} kind {kind!r} is not natural/document")
                return b.side(role, s.get("text"), img, override or s.get("instruction") or default, kind, s.get("id"))

            query = make("query", q, table_q, query_instruction)
            pos = make("pos", p, table_t, target_instruction)
            negatives = [make(f"neg{j}", n, table_t, target_instruction) for j, n in enumerate(negs)]
            return b.build(query, pos, negatives, dict(rec.get("meta") or {}) | {"source": f"{path.name}:{lineno}"})

        rows = (_guard(lambda ln=ln, rec=rec: build(ln, rec)) for ln, rec in records)
        report = _write(rows, name, out_dir, maxcount, len(records), progress)
        reports.append(report)
    if parse.total:  # lines that never reached a dataset are reported with the first one
        if reports:
            reports[0].skipped = SkipCounter().merge(reports[0].skipped).merge(parse).as_dict()
        else:
            reports.append(ConvertReport(dataset or path.stem, skipped=parse.as_dict()))
    return reports


# ------------------------------------------------------------------------------------------------------------ LLaVA
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "model": "gpt"}


@dataclass
class LlavaReport:
    """Normalised records and the counts of records dropped, by reason."""

    records: list[dict[str, Any]]
    skipped: dict[str, int]

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"kept {len(self.records)} conversations; skipped: {skipped}"


def normalize_llava(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    out: str | os.PathLike | None = None,
    check_images: bool = True,
) -> LlavaReport:
    """Validate and normalise LLaVA-style instruction data.

    Normalises roles (``user``/``assistant`` -> ``human``/``gpt``), ids (strings, filled if absent) and a single
    image given as a one-element list; adds missing ``<image>`` placeholders at the start of the first human turn.
    Drops (and counts) records that are not dicts (``bad_record``), have unknown roles (``bad_role``), turns that do
    not alternate human/gpt starting with human and ending with gpt (``bad_turns``), empty or non-string values
    (``empty_turn``), more placeholders than images (``placeholder_mismatch``) or missing image files
    (``missing_image``).

    Args:
        path: The JSON file (a list of records).
        image_root: Folder image paths are relative to (default: the JSON's folder).
        out: Where to write the normalised JSON (optional).
        check_images: Check that every image file exists.

    Raises:
        ValueError: The file is not a JSON list.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path}: not valid JSON ({exn}); LLaVA data is one JSON list of records") from exn
    if not isinstance(data, list):
        raise ValueError(f"{path}: top level is {type(data).__name__}; LLaVA data is a JSON list of records")
    kept, skipped = [], Counter()
    for i, rec in enumerate(data):
        reason = None
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list) or not rec["conversations"]:
            reason = "bad_record"
        else:
            images = rec.get("image")
            images = [] if images in (None, "") else ([images] if isinstance(images, str) else list(images))
            turns = []
            for turn in rec["conversations"]:
                role = _ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
                if role is None:
                    reason = "bad_role"
                    break
                value = turn.get("value")
                if not isinstance(value, str) or not value.strip():
                    reason = "empty_turn"
                    break
                turns.append({"from": role, "value": value})
            if reason is None:
                roles = [t["from"] for t in turns]
                if roles != ["human", "gpt"] * (len(roles) // 2) or len(roles) % 2:
                    reason = "bad_turns"
            if reason is None:
                placeholders = sum(t["value"].count("<image>") for t in turns if t["from"] == "human")
                if placeholders > len(images):
                    reason = "placeholder_mismatch"
                elif placeholders < len(images):
                    turns[0]["value"] = "<image>\n" * (len(images) - placeholders) + turns[0]["value"]
            if reason is None and check_images and any(not (root / p).is_file() for p in images):
                reason = "missing_image"
            if reason is None:
                norm: dict[str, Any] = {"id": str(rec.get("id", f"{path.stem}_{i}"))}
                if images:
                    norm["image"] = images[0] if len(images) == 1 else images
                norm["conversations"] = turns
                kept.append(norm)
        if reason is not None:
            skipped[reason] += 1
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return LlavaReport(kept, dict(sorted(skipped.items())))
