"""Shard tools for people: ``count`` (JSON members only) and ``inspect`` (decoded samples as tables).

Both read shards with the training reader and check samples with its checks, so a sample ``count`` accepts is one
training reads (``count`` does not decode images; ``inspect`` does).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from mmembed.data.decode import DecodedSample, image_members, validate_raw
from mmembed.data.reading import expand_urls, iter_decoded, shard_samples
from mmembed.data.skips import SkipCounter, SkipSample


def count_shards(urls: str | Sequence[str], counter: SkipCounter | None = None) -> dict[str, Any]:
    """Count samples per dataset, task and meta-task, as training would read them, without decoding images.

    The shards go through the training reader itself (:func:`~mmembed.data.reading.shard_samples`: the same tar
    grouping, truncation and corruption checks) and every sample through the same checks as
    :func:`~mmembed.data.decode.decode_sample` -- :func:`~mmembed.data.decode.validate_raw` and
    :func:`~mmembed.data.decode.image_members` -- short of decoding the images. So a key that comes back later in a
    shard, or an image member cut off by a truncated copy, is counted as training counts it; only ``corrupt_image``,
    ``unsupported_mode`` and ``decompression_bomb`` (which need the pixels) show in ``inspect`` and training alone.

    Returns:
        ``{"shards", "samples", "by_dataset": {name: n}, "by_task": {...}, "by_meta_task": {...},
        "by_shard": {url: n}, "skipped": {reason: n}}``.
    """
    counter = counter if counter is not None else SkipCounter("count")
    urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
    by: dict[str, Counter[str]] = {k: Counter() for k in ("by_dataset", "by_task", "by_meta_task", "by_shard")}
    seen_ids: set[str] = set()
    for raw in shard_samples(({"url": u} for u in urls), counter):
        url, key = str(raw.get("__url__")), str(raw.get("__key__", ""))
        try:
            sample = validate_raw(raw, seen_ids)
            image_members(raw, sample)
        except SkipSample as skip:
            counter.add(skip.reason, where=f"{url}:{key[:80]}", detail=skip.detail)
            continue
        for name, value in (("by_dataset", sample.dataset), ("by_task", sample.task),
                            ("by_meta_task", sample.meta_task), ("by_shard", url)):
            by[name][value] += 1
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
