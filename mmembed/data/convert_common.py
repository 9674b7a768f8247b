"""What the converters share (:mod:`mmembed.data.converters`, :mod:`mmembed.data.jsonl`): the report of a
conversion, instructions by dataset name, image bytes and their extension, and the sample builder / shard writer."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmembed.data.schema import META_TASKS, TASKS, Sample, SchemaError, Side
from mmembed.data.skips import SkipCounter, SkipSample
from mmembed.data.writing import write_shards
from mmembed.prompts.embedding import instructions_for

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
