"""Reading a corpus to index: ids, ``Item`` s and metadata from shards, a BEIR folder or a parquet file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmembed.types import Item


@dataclass
class Corpus:
    """What gets indexed: one id, one ``Item`` and one metadata dict per entry, in order."""

    ids: list[str]
    items: list[Item]
    metadata: list[dict[str, Any]]
    source: str = ""
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def _meta(item: Item, **extra: Any) -> dict[str, Any]:
    meta = {k: v for k, v in extra.items() if v is not None}
    if item.text:
        meta["text"] = item.text
    if isinstance(item.image, str | Path):
        meta["image"] = str(item.image)
    meta["kind"] = item.kind
    return meta


def corpus_from_shards(spec: str | os.PathLike) -> Corpus:
    """The unique positives of training shards, with the ids mining gives them (so mining can reuse the index).

    A positive's id is its ``Side.id``, else ``{dataset}/sha1:{content hash}``; repeats are kept once.
    """
    from mmembed.data.decode import side_to_item
    from mmembed.data.identity import corpus_id
    from mmembed.data.reading import expand_urls, iter_decoded
    from mmembed.data.skips import SkipCounter

    counter = SkipCounter("index")
    ids, items, meta, seen = [], [], [], set()
    for dec in iter_decoded(expand_urls(str(spec)), counter=counter):
        pos = dec.sample.positive
        image = dec.images.get(pos.image) if pos.image is not None else None
        cid = corpus_id(dec.sample.dataset, pos, image)
        if cid in seen:
            continue
        seen.add(cid)
        item = side_to_item(pos, dec.images)
        ids.append(cid)
        items.append(item)
        meta.append(_meta(item, dataset=dec.sample.dataset, sample=dec.sample.id))
    return Corpus(ids, items, meta, source=str(spec), skipped=counter.as_dict())


def corpus_from_beir(folder: str | os.PathLike) -> Corpus:
    """The page corpus of a BEIR-layout VisDoc set (``corpus`` part; queries and qrels are read but not indexed)."""
    from mmembed.data.evalsets import read_beir_visdoc

    data = read_beir_visdoc(folder)
    return Corpus(list(data.corpus_ids), list(data.corpus),
                  [_meta(it, set=data.name) for it in data.corpus], source=str(folder))


def corpus_from_parquet(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Corpus:
    """A parquet corpus: an MMEB subset (its pooled candidates) or a table with ``text`` and/or ``image`` columns.

    The generic table may also have ``id``, ``instruction`` and ``kind`` columns; ``image`` cells are paths
    (relative to ``image_root``, default the file's folder) or Hugging Face image structs / bytes.
    """
    from mmembed.data.evalsets import image_cell, read_mmeb, read_parquet

    path = Path(path)
    table = read_parquet(path, "corpus parquet")
    cols = set(table.column_names)
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    if "tgt_text" in cols:
        subset = read_mmeb(path, root, version="v2" if "tgt_inst" in cols else "v1")
        return Corpus([f"{subset.name}/c{i}" for i in range(len(subset.candidates))], list(subset.candidates),
                      [_meta(it, subset=subset.name) for it in subset.candidates], source=str(path))
    if not cols & {"text", "image"}:
        raise ValueError(f"{path}: a corpus parquet needs a 'text' and/or 'image' column (or MMEB's tgt_text); "
                         f"it has {sorted(cols)}")
    from mmembed.data.images import open_image

    ids, items, meta = [], [], []
    for i, rec in enumerate(table.to_pylist()):
        image = None
        if rec.get("image") is not None:
            data, rel = image_cell(rec["image"])
            if data:
                image = open_image(data)
            elif rel:
                image = Path(rel) if Path(rel).is_absolute() else root / rel
        text = rec.get("text") or None
        item = Item(text=text, image=image, instruction=rec.get("instruction") or None,
                    kind=rec.get("kind") or "natural")
        if item.is_empty:
            raise ValueError(f"{path} row {i}: neither text nor image; drop the row or fill it")
        ids.append(str(rec["id"]) if rec.get("id") is not None else f"{path.stem}/{i}")
        items.append(item)
        meta.append(_meta(item))
    return Corpus(ids, items, meta, source=str(path))


def load_corpus(spec: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Corpus:
    """Read a corpus from shards (``.tar`` files, a folder of them, a glob or brace pattern), a BEIR folder
    (``corpus``/``queries``/``qrels`` parts) or a ``.parquet`` file/folder."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        if any((path / p).exists() for p in ("corpus.parquet", "corpus")) and (
                (path / "qrels.parquet").exists() or (path / "qrels").exists()):
            return corpus_from_beir(path)
        if any(path.glob("*.tar")):
            return corpus_from_shards(path)
        if any(path.glob("*.parquet")):
            return corpus_from_parquet(path, image_root)
        raise ValueError(f"{path}: no shards (*.tar), BEIR parts (corpus + qrels) or parquet files found")
    if text.endswith(".parquet"):
        return corpus_from_parquet(path, image_root)
    if ".tar" in text or any(c in text for c in "*{"):
        return corpus_from_shards(text)
    raise ValueError(f"cannot tell what corpus {text!r} is; pass shards (.tar, folder, glob, brace pattern), "
                     "a BEIR folder or a .parquet file")
