"""Readers for the evaluation formats: MMEB image subsets (v2 and v1 parquet) and BEIR-layout VisDoc sets.

Both return :class:`mmembed.types.Item` s with instructions and ``kind`` filled in, de-duplicated so that every
distinct input is embedded once:

* MMEB: each row is a query ranked against its *own* candidate list (ground truth first). Queries and candidates
  are pooled per subset by their full input (instruction, text, image path), and rows refer to them by index.
* VisDoc: each query is ranked against the whole corpus; relevance comes from the qrels.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmembed.prompts.embedding import instructions_for
from mmembed.types import Item

IMAGE_PLACEHOLDER = "<|image_1|>"
V2_COLUMNS = ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path")
V1_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")

#: Subsets whose query images are documents (tiled), or whose candidates are; by MMEB (and synthetic) name.
DOCUMENT_QUERY_SUBSETS = frozenset({"DocVQA", "InfographicsVQA", "ChartQA", "synth_vqa_doc"})
DOCUMENT_CANDIDATE_SUBSETS = frozenset({"Wiki-SS-NQ"})

#: The paper's T->VD instructions (Table 11: identical for ColPali, VisRAG, ViDoSeek and MMLongBench).
VISDOC_QUERY_INSTRUCTION, VISDOC_TARGET_INSTRUCTION = instructions_for("ColPali")

# Legacy (MMEB v1 / MMEB-train) strings fuse "instruction: content". These verbs open every VLM2Vec instruction.
_INSTRUCTION_START = re.compile(r"^(Represent|Find|Retrieve|Select|Identify|Given|Match|Determine|Classify)\b")


def strip_placeholder(text: str | None) -> str:
    """Remove the legacy ``<|image_1|>`` placeholder (the template adds the image token itself) and trim."""
    return (text or "").replace(IMAGE_PLACEHOLDER, " ").strip()


def split_legacy_text(text: str | None) -> tuple[str | None, str | None]:
    """Split a legacy fused string into ``(instruction, text)``.

    MMEB v1 and MMEB-train put the instruction inside the text, e.g.
    ``"<|image_1|>\\nRepresent the given image with the following question: What is on the table?"``. A string that
    opens with an instruction verb is split at its first colon or line break (neither: it is all instruction, as in
    ``"<|image_1|>\\nRepresent the given image."``); any other string is all text (class labels, captions, answers).
    """
    s = strip_placeholder(text)
    if not s:
        return None, None
    if not _INSTRUCTION_START.match(s):
        return None, s
    head, _, rest = re.split(r"([:\n])", s, maxsplit=1) if re.search(r"[:\n]", s) else (s, "", "")
    return head.strip(), rest.strip() or None


def _none_if_empty(value: Any) -> str | None:
    if value is None:
        return None
    value = str(value).strip()
    return value or None


_HUB_SHARD = re.compile(r"^(?P<split>[\w.]+)-\d{5}-of-\d{5}$")


def hub_splits(files: Sequence[Path]) -> dict[str, list[Path]]:
    """Group hub shard files (``{split}-00000-of-0000N.parquet``) by split; other file names are left out."""
    out: dict[str, list[Path]] = {}
    for f in files:
        m = _HUB_SHARD.match(f.stem)
        if m:
            out.setdefault(m["split"], []).append(f)
    return out


def read_parquet(path: Path, what: str, split: str | None = None) -> pa.Table:
    """Read one parquet file, or every ``*.parquet`` under a folder (the Hugging Face layout), as one table.

    Args:
        path: A parquet file or a folder of them.
        what: What is read, for error messages.
        split: In a folder of hub shards (``{split}-00000-of-0000N.parquet``), read only this split's shards
            (MMEB-train ships ``original`` and ``diverse_instruction`` side by side). Without it, a folder holding
            shards of several splits is an error rather than a silent concatenation.
    """
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .parquet files; point to the {what} parquet file or its folder")
        splits = hub_splits(files)
        if split is not None:
            if split not in splits:
                raise FileNotFoundError(f"{path} has no '{split}-*.parquet' shards (splits there: {sorted(splits)}); "
                                        "choose one of those")
            files = splits[split]
        elif len(splits) > 1:
            raise ValueError(f"{path} holds shards of several splits {sorted(splits)}; choose one (split=...)")
        return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; point to the {what} parquet file or its folder")
    return pq.read_table(path)


def _require(table: pa.Table, columns: Sequence[str], path: Path, fix: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (has {table.column_names}); {fix}")


def _list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if not isinstance(value, str) else [value]


# -------------------------------------------------------------------------------------------------------------- MMEB
@dataclass
class MMEBRow:
    """One eval query: index into ``MMEBSubset.queries`` and candidate indices (ground truth first)."""

    query: int
    candidates: list[int]


@dataclass
class MMEBSubset:
    """An MMEB subset ready to embed: unique queries and candidates, and the rows that rank them.

    Attributes:
        name: Subset name.
        queries: Unique query inputs.
        candidates: Unique candidate inputs, pooled over all rows.
        rows: One per parquet row.
        meta_task: ``classification`` / ``vqa`` / ``retrieval`` / ``grounding`` if known.
        split: ``IND`` / ``OOD`` if known.
    """

    name: str
    queries: list[Item]
    candidates: list[Item]
    rows: list[MMEBRow]
    meta_task: str | None = None
    split: str | None = None

    def __len__(self) -> int:
        return len(self.rows)


class _Pool:
    """De-duplicates Items by their full input (instruction, text, image path, kind)."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self._index: dict[tuple, int] = {}

    def add(self, instruction: str | None, text: str | None, image: str | None, kind: str) -> int:
        key = (instruction, text, image, kind)
        if key not in self._index:
            self._index[key] = len(self.items)
            self.items.append(Item(text=text, image=image, instruction=instruction, kind=kind))  # type: ignore[arg-type]
        return self._index[key]


def read_mmeb(
    parquet_path: str | os.PathLike,
    image_root: str | os.PathLike,
    version: str = "v2",
    *,
    name: str | None = None,
    query_kind: str | None = None,
    candidate_kind: str | None = None,
    meta_task: str | None = None,
    split: str | None = None,
    check_images: bool = True,
    instructions: str = "paper",
) -> MMEBSubset:
    """Read one MMEB image-eval subset.

    Args:
        parquet_path: The subset's parquet file, or a folder of parquet files (Hugging Face layout).
        image_root: Folder the ``*_img_path`` columns are relative to.
        version: ``"v2"`` (separate ``qry_inst`` / ``tgt_inst`` columns) or ``"v1"`` (instruction inside the text,
            split off with :func:`split_legacy_text`, as VLM2Vec's v1 evaluation feeds it).
        name: Subset name (default: the file or folder stem).
        query_kind / candidate_kind: ``"natural"`` or ``"document"``; by default ``"document"`` for the subsets
            in :data:`DOCUMENT_QUERY_SUBSETS` / :data:`DOCUMENT_CANDIDATE_SUBSETS`.
        meta_task / split: Labels carried into the result for reporting.
        check_images: Fail early, naming the first missing file, if any referenced image is absent.
        instructions: ``"paper"`` (default): the query/target instructions of the paper's Tables 11-12 for this
            subset name -- the ones training uses -- replacing the file's (every v1 bare-label candidate gets the
            target instruction too); names not in the tables keep the file's. ``"file"``: the file's own.

    Raises:
        ValueError: Unknown version or instructions mode, missing columns, or a row whose text and image lists
            differ in length.
        FileNotFoundError: Missing parquet or images.
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"unknown MMEB version {version!r}; use 'v2' (qry_inst/tgt_inst columns) or 'v1'")
    if instructions not in ("paper", "file"):
        raise ValueError(f"instructions must be 'paper' (Tables 11-12) or 'file', got {instructions!r}")
    path, root = Path(parquet_path), Path(image_root)
    name = name or path.stem
    paper: tuple[str, str] | None = None
    if instructions == "paper":
        try:
            paper = instructions_for(name)
        except KeyError:
            paper = None  # not a public subset (e.g. synthetic): the file's instructions are the only ones
    table = read_parquet(path, f"MMEB {version} subset")
    columns = V2_COLUMNS if version == "v2" else V1_COLUMNS
    other = "v1" if version == "v2" else "v2"
    _require(table, columns, path, f"is this MMEB {other}? pass version='{other}'")
    qkind = query_kind or ("document" if name in DOCUMENT_QUERY_SUBSETS else "natural")
    ckind = candidate_kind or ("document" if name in DOCUMENT_CANDIDATE_SUBSETS else "natural")
    queries, candidates, rows = _Pool(), _Pool(), []

    def image(rel: Any) -> str | None:
        rel = _none_if_empty(rel)
        return None if rel is None else str(root / rel)

    for i, rec in enumerate(table.select(list(columns)).to_pylist()):
        if version == "v2":
            q_inst, q_text = _none_if_empty(strip_placeholder(rec["qry_inst"])), _none_if_empty(
                strip_placeholder(rec["qry_text"])
            )
        else:
            q_inst, q_text = split_legacy_text(rec["qry_text"])
        texts, paths = _list(rec["tgt_text"]), _list(rec["tgt_img_path"])
        if not paths:
            paths = [None] * len(texts)
        if not texts:
            texts = [None] * len(paths)
        if len(texts) != len(paths) or not texts:
            raise ValueError(f"{path} row {i}: tgt_text has {len(texts)} entries and tgt_img_path {len(paths)}; "
                             "each candidate needs one of each (use '' for an absent text or image)")
        if paper is not None:
            q_inst = paper[0]
        q = queries.add(q_inst, q_text, image(rec["qry_img_path"]), qkind)
        t_inst = _none_if_empty(strip_placeholder(rec["tgt_inst"])) if version == "v2" else None
        cands = []
        for text, img in zip(texts, paths):
            if version == "v2":
                c_inst, c_text = t_inst, _none_if_empty(strip_placeholder(text))
            else:
                c_inst, c_text = split_legacy_text(text)
            if paper is not None:
                c_inst = paper[1]
            cands.append(candidates.add(c_inst, c_text, image(img), ckind))
        rows.append(MMEBRow(q, cands))
    subset = MMEBSubset(name, queries.items, candidates.items, rows, meta_task=meta_task, split=split)
    if check_images:
        _check_images([*subset.queries, *subset.candidates], root, path)
    return subset


def _check_images(items: Sequence[Item], root: Path, source: Path) -> None:
    paths = sorted({str(it.image) for it in items if isinstance(it.image, str | Path)})
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images named in {source} are missing under {root} (first: {missing[0]}); "
            "pass the folder that holds the benchmark's images as image_root"
        )


def load_mmeb_suite(
    root: str | os.PathLike,
    subsets: Mapping[str, Mapping[str, Any]] | Sequence[str] | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    version: str = "v2",
) -> dict[str, MMEBSubset]:
    """Read several MMEB subsets from ``root/{name}.parquet`` (or ``root/{name}/``).

    Args:
        root: Folder with one parquet file (or folder) per subset.
        subsets: Names, or name -> ``{"meta_task", "split", "query_kind", "candidate_kind"}``; default: the
            ``subsets.json`` in ``root`` (as the synthetic world writes it).
        image_root: Image folder (default ``root/images``).
    """
    root = Path(root)
    if subsets is None:
        listing = root / "subsets.json"
        if not listing.exists():
            raise FileNotFoundError(f"{listing} not found; pass the subset names (e.g. from the eval config)")
        subsets = json.loads(listing.read_text())
    info = {n: {} for n in subsets} if not isinstance(subsets, Mapping) else subsets
    out = {}
    for name, meta in info.items():
        path = root / f"{name}.parquet"
        out[name] = read_mmeb(
            path if path.exists() else root / name,
            image_root if image_root is not None else root / "images",
            version,
            name=name,
            query_kind=meta.get("query_kind"),
            candidate_kind=meta.get("candidate_kind"),
            meta_task=meta.get("meta_task"),
            split=meta.get("split"),
        )
    return out


# ------------------------------------------------------------------------------------------------------------ VisDoc
@dataclass
class VisDocSet:
    """A BEIR-layout visual-document retrieval set.

    Attributes:
        name: Set name.
        query_ids / queries: Query ids and their Items (text only).
        corpus_ids / corpus: Page ids and their Items (``kind="document"``, image paths).
        qrels: query id -> {corpus id: relevance score}.
        dropped: Queries left out and why (e.g. ``no_qrels``, ``language``), for reporting.
    """

    name: str
    query_ids: list[str]
    queries: list[Item]
    corpus_ids: list[str]
    corpus: list[Item]
    qrels: dict[str, dict[str, int]]
    split: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)


def find_beir_part(folder: Path, part: str) -> Path:
    for cand in (folder / f"{part}.parquet", folder / part):
        if cand.exists():
            return cand
    raise FileNotFoundError(
        f"{folder} has no {part}.parquet or {part}/ folder; a BEIR set needs queries, corpus and qrels"
    )


def _default_image_dir(folder: Path) -> Path:
    """``folder/images``, or a per-folder cache under the temp dir when the set's folder is read-only."""
    if os.access(folder, os.W_OK):
        return folder / "images"
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "mmembed-visdoc-pages" / f"{folder.name}-{digest}"


def _image_suffix(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    return ".img"


def image_cell(value: Any) -> tuple[bytes | None, str | None]:
    """``(bytes, path)`` of an image cell in a parquet: HF ``Image`` struct (bytes/path), raw bytes, or a path."""
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    return None, None


def _corpus_image(value: Any, cid: str, folder: Path, image_dir: Path) -> str:
    """A file path for a corpus ``image`` cell: HF Image struct (bytes/path), raw bytes, or a path string."""
    data, rel = image_cell(value)
    if data:
        target = image_dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", cid) + _image_suffix(data))
        if not target.exists() or target.stat().st_size != len(data):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return str(target)
    if rel:
        path = Path(rel) if Path(rel).is_absolute() else folder / rel
        if path.exists():
            return str(path)
        raise FileNotFoundError(f"corpus page {cid!r}: image {path} not found; keep page images next to corpus.parquet")
    raise ValueError(f"corpus page {cid!r} has no image bytes or path; the corpus 'image' column must hold the pages")


def read_beir_visdoc(
    folder: str | os.PathLike,
    *,
    name: str | None = None,
    image_dir: str | os.PathLike | None = None,
    language: str | None = None,
    query_instruction: str = VISDOC_QUERY_INSTRUCTION,
    target_instruction: str = VISDOC_TARGET_INSTRUCTION,
    split: str | None = None,
) -> VisDocSet:
    """Read a ViDoRe/VisRAG-style BEIR set: ``queries`` (query-id, query), ``corpus`` (corpus-id, image), ``qrels``.

    Each part may be ``{part}.parquet`` or a ``{part}/`` folder of parquet files (the Hugging Face layout). Page
    images stored as bytes are written once to ``image_dir`` (default ``folder/images``, or a temp-dir cache if the
    folder is read-only) so Items hold paths and a large corpus is not kept decoded in memory.

    Args:
        language: Keep only queries whose ``language`` column equals this (ViDoRe v2 is multilingual).
        query_instruction / target_instruction: Default to the paper's T->VD instructions.

    Raises:
        ValueError: Missing columns, or qrels naming pages absent from the corpus.
    """
    folder = Path(folder)
    name = name or folder.name
    image_dir = Path(image_dir) if image_dir is not None else _default_image_dir(folder)
    parts = {p: find_beir_part(folder, p) for p in ("queries", "corpus", "qrels")}
    queries_t = read_parquet(parts["queries"], "BEIR queries")
    _require(queries_t, ["query-id", "query"], parts["queries"], "BEIR queries need 'query-id' and 'query'")
    qrels_t = read_parquet(parts["qrels"], "BEIR qrels")
    _require(qrels_t, ["query-id", "corpus-id", "score"], parts["qrels"], "BEIR qrels need query-id, corpus-id, score")
    corpus_t = read_parquet(parts["corpus"], "BEIR corpus")
    _require(corpus_t, ["corpus-id", "image"], parts["corpus"], "the corpus needs 'corpus-id' and page 'image'")

    dropped: dict[str, int] = {}
    qcols = ["query-id", "query"] + (["language"] if language is not None else [])
    if language is not None and "language" not in queries_t.column_names:
        raise ValueError(f"{parts['queries']}: no 'language' column to filter on; drop the language argument")
    qrels: dict[str, dict[str, int]] = {}
    for rec in qrels_t.select(["query-id", "corpus-id", "score"]).to_pylist():
        qrels.setdefault(str(rec["query-id"]), {})[str(rec["corpus-id"])] = int(rec["score"])
    query_ids, queries = [], []
    for rec in queries_t.select(qcols).to_pylist():
        qid = str(rec["query-id"])
        if language is not None and rec["language"] != language:
            dropped["language"] = dropped.get("language", 0) + 1
            continue
        if not any(s > 0 for s in qrels.get(qid, {}).values()):
            dropped["no_qrels"] = dropped.get("no_qrels", 0) + 1
            continue
        query_ids.append(qid)
        queries.append(Item(text=str(rec["query"]), instruction=query_instruction, kind="natural"))
    kept = set(query_ids)
    qrels = {q: r for q, r in qrels.items() if q in kept}

    corpus_ids, corpus = [], []
    for rec in corpus_t.select(["corpus-id", "image"]).to_pylist():
        cid = str(rec["corpus-id"])
        corpus_ids.append(cid)
        corpus.append(Item(image=_corpus_image(rec["image"], cid, folder, image_dir), instruction=target_instruction,
                           kind="document"))
    known = set(corpus_ids)
    unknown = sorted({c for r in qrels.values() for c in r if c not in known})
    if unknown:
        raise ValueError(f"{parts['qrels']}: {len(unknown)} corpus ids are not in the corpus (first: {unknown[0]}); "
                         "the qrels and corpus must come from the same set")
    return VisDocSet(name, query_ids, queries, corpus_ids, corpus, qrels, split=split, dropped=dropped)


def load_visdoc_suite(
    root: str | os.PathLike,
    sets: Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None,
    *,
    image_dir: str | os.PathLike | None = None,
) -> dict[str, VisDocSet]:
    """Read several BEIR sets from ``root/{name}/``; default: those listed in ``root/sets.json``.

    Args:
        image_dir: Where page images are cached, one subfolder per set (default: each set's own folder).
    """
    root = Path(root)
    if sets is None:
        listing = root / "sets.json"
        if not listing.exists():
            raise FileNotFoundError(f"{listing} not found; pass the set names (e.g. from the eval config)")
        sets = json.loads(listing.read_text())
    info = {n: {} for n in sets} if not isinstance(sets, Mapping) else sets
    return {
        n: read_beir_visdoc(root / n, name=n, split=meta.get("split"),
                            image_dir=Path(image_dir) / n if image_dir is not None else None)
        for n, meta in info.items()
    }
