"""Generic JSON lines to mmembed shards: ``{"query": {...}, "positive": {...}, "negatives": [...], ...}`` per line."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmembed.data.convert_common import (
    ConvertReport,
    _Builder,
    _guard,
    _write,
    read_image_file,
    resolve_instructions,
)
from mmembed.data.schema import META_TASKS, TASKS, Sample, Side
from mmembed.data.skips import SkipCounter, SkipSample


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
