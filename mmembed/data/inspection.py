"""Shard tools for people: ``count`` (JSON members only) and ``inspect`` (decoded samples as tables).

Both check samples with the same :func:`~mmembed.data.decode.validate_raw` the training reader uses, so a sample
``count`` accepts is one training reads (``count`` does not open images; ``inspect`` does).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from webdataset import tariterators

from mmembed.data.decode import DecodedSample, validate_raw
from mmembed.data.reading import expand_urls, iter_decoded, shard_samples
from mmembed.data.schema import Sample
from mmembed.data.skips import SkipCounter, SkipSample


def count_shards(urls: str | Sequence[str], counter: SkipCounter | None = None) -> dict[str, Any]:
    """Count samples per dataset, task and meta-task, reading the JSON members and only the names of the others.

    Samples are checked with :func:`~mmembed.data.decode.validate_raw` (the training reader's check) and their image
    members must be present; images are not decoded, so ``corrupt_image`` and ``decompression_bomb`` show only
    in ``inspect`` and training.

    Returns:
        ``{"shards", "samples", "by_dataset": {name: n}, "by_task": {...}, "by_meta_task": {...},
        "by_shard": {url: n}, "skipped": {reason: n}}``.
    """
    counter = counter if counter is not None else SkipCounter("count")
    urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
    by: dict[str, Counter[str]] = {k: Counter() for k in ("by_dataset", "by_task", "by_meta_task", "by_shard")}
    # Names of the non-JSON members of the shard being read, by key: enough to check the images are there.
    others: dict[tuple[str, str], set[str]] = defaultdict(set)
    pending: list[tuple[str, str, Sample]] = []  # this shard's valid samples, checked for members at its end

    def select(fname: str) -> bool:
        if fname.endswith(".json"):
            return True
        prefix, suffix = tariterators.base_plus_ext(fname)
        if prefix is not None:
            others[(counter._current_shard, prefix)].add(suffix.lower())
        return False

    def finish_shard(url: str) -> None:
        with_json = {key for u, key, _ in pending if u == url}
        for u, key, sample in pending:
            have = others.get((u, key), set())
            missing = [s.image for s in sample.sides if s.image is not None and s.image.lower() not in have]
            if missing:
                counter.add("missing_member", where=f"{u}:{key}", detail=f"no member {missing[0]!r}")
                continue
            for name, value in (("by_dataset", sample.dataset), ("by_task", sample.task),
                                ("by_meta_task", sample.meta_task), ("by_shard", u)):
                by[name][value] += 1
        for u, key in [k for k in others if k[0] == url]:
            if key not in with_json and key not in invalid:
                counter.add("missing_member", where=f"{u}:{key}", detail="no .json member")
            del others[(u, key)]
        pending.clear()
        invalid.clear()

    invalid: set[str] = set()  # keys of this shard whose JSON was refused (their images are not counted again)
    seen_ids: set[str] = set()
    url = None
    for raw in shard_samples(({"url": u} for u in urls), counter, select_files=select):
        if raw.get("__url__") != url:
            if url is not None:
                finish_shard(url)
            url = raw.get("__url__")
        key = str(raw.get("__key__", ""))
        try:
            sample = validate_raw(raw, seen_ids)
        except SkipSample as skip:
            counter.add(skip.reason, where=f"{url}:{key[:80]}", detail=skip.detail)
            invalid.add(key)
            continue
        pending.append((str(url), key, sample))
    if url is not None:
        finish_shard(url)
    for u, key in list(others):  # shards without any JSON member
        counter.add("missing_member", where=f"{u}:{key}", detail="no .json member")
    return {
        "shards": len(urls),
        "samples": sum(by["by_dataset"].values()),
        **{k: dict(sorted(v.items())) for k, v in by.items()},
        "skipped": counter.as_dict(),
    }


def _short(text: str | None, n: int = 70) -> str:
    if text is None:
        return "-"
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def inspect_shards(urls: str | Sequence[str], n: int = 3, console: Any = None) -> list[DecodedSample]:
    """Print the first ``n`` decoded samples (sides, images, meta keys) as rich tables; returns them."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    counter = SkipCounter("inspect")
    shown: list[DecodedSample] = []
    for dec in iter_decoded(urls, counter=counter):
        s = dec.sample
        table = Table(title=f"{s.id}  [{s.dataset} | {s.task} | {s.meta_task}]  ({dec.url})", show_lines=False)
        for col in ("side", "kind", "instruction", "text", "image"):
            table.add_column(col)
        names = ["query", "positive", *[f"neg{i}" for i in range(len(s.negatives))],
                 *[f"xpos{i}" for i in range(len(s.extra_positives))]]
        for name, side in zip(names, s.sides):
            img = dec.images.get(side.image) if side.image else None
            img_desc = f"{side.image} {img.size[0]}x{img.size[1]}" if img is not None else "-"
            table.add_row(name, side.kind, _short(side.instruction, 40), _short(side.text), img_desc)
        console.print(table)
        if s.meta:
            console.print(f"meta: {_short(json.dumps(s.meta, sort_keys=True), 200)}")
        shown.append(dec)
        if len(shown) >= n:
            break
    if counter.total:
        console.print(f"[yellow]skipped while reading: {counter.as_dict()}[/yellow]")
    return shown
