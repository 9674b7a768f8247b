"""Writing WebDataset shards in the :mod:`mmembed.data.schema` layout, byte-reproducibly.

Tar headers get a fixed mtime, owner and mode, members are sorted by webdataset's ``TarWriter``, JSON is dumped with
sorted keys and PIL images are PNG-encoded with fixed settings, so identical input gives identical files.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from mmembed.data.schema import IMAGE_MEMBER, Sample

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_ENCODE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}


def sample_key(sample_id: str) -> str:
    """The tar key for a sample id: webdataset splits member names at the first dot, so only ``[A-Za-z0-9_-]``."""
    return _KEY_UNSAFE.sub("_", sample_id)


def encode_image(image: Image.Image, ext: str, png_compress_level: int = 6) -> bytes:
    """Encode a PIL image deterministically in the format named by ``ext`` (``png`` or ``jpg``)."""
    fmt = _ENCODE_FORMATS.get(ext.lower())
    if fmt is None:
        raise ValueError(f"cannot encode a PIL image as {ext!r}; name the member *.png or *.jpg, or pass bytes")
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, format="PNG", compress_level=png_compress_level, optimize=False)
    else:
        image.convert("RGB").save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _image_members(sample: Sample) -> list[str]:
    return [s.image for s in sample.sides if s.image is not None]


def _validate_for_writing(sample: Sample, images: Mapping[str, Any]) -> None:
    wanted = _image_members(sample)
    for name in wanted:
        if not IMAGE_MEMBER.match(name):
            raise ValueError(
                f"sample {sample.id!r}: image member {name!r} must look like 'query.png', 'pos.jpg' or 'neg0.png'"
            )
    if sorted(wanted) != sorted(images):
        raise ValueError(
            f"sample {sample.id!r}: its sides name images {sorted(wanted)} but {sorted(images)} were given; "
            "pass exactly one image per side whose Side.image is set"
        )
    for side in sample.sides:
        if side.is_empty:
            raise ValueError(f"sample {sample.id!r}: a side has neither text nor image; drop the sample or fill it")


def write_shards(
    samples: Iterable[tuple[Sample, Mapping[str, Image.Image | bytes]]],
    pattern: str,
    maxcount: int = 1000,
    *,
    maxsize: float = 1e9,
    start_shard: int = 0,
    png_compress_level: int = 6,
    on_sample: Callable[[Sample], None] | None = None,
) -> list[str]:
    """Write samples to WebDataset tar shards, byte-identically for identical input.

    Args:
        samples: ``(sample, images)`` pairs; ``images`` maps each member name used in the sample's sides
            (``"query.png"``, ``"pos.jpg"``, ``"neg0.png"``) to a PIL image (encoded here) or to encoded bytes
            (stored as they are).
        pattern: Output path with a printf-style shard index, e.g. ``"out/train/synth_cls-%06d.tar"``.
        maxcount: Samples per shard.
        maxsize: Bytes per shard (a new shard starts once this is exceeded).
        start_shard: Index of the first shard.
        png_compress_level: zlib level for PNG-encoded PIL images (1 fast ... 9 small).
        on_sample: Called after each sample is written (e.g. to advance a progress bar).

    Returns:
        The shard paths written, in order (empty when ``samples`` is empty).

    Raises:
        ValueError: For a pattern without a shard index, duplicate sample keys, or images that do not match the
            sides' ``image`` fields.
    """
    try:
        distinct = (pattern % 0) != (pattern % 1)
    except TypeError:
        distinct = False
    if not distinct:
        raise ValueError(f"pattern {pattern!r} needs one printf-style shard index, e.g. 'out/name-%06d.tar'")
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    seen: set[str] = set()
    writer = wds.ShardWriter(
        pattern,
        maxcount=maxcount,
        maxsize=maxsize,
        start_shard=start_shard,
        verbose=0,
        post=written.append,
        encoder=False,
        mtime=0.0,
        user="mmembed",
        group="mmembed",
        mode=0o444,
    )
    first = pattern % start_shard
    try:
        for sample, images in samples:
            _validate_for_writing(sample, images)
            key = sample_key(sample.id)
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r} (from id {sample.id!r}); sample ids must be unique")
            seen.add(key)
            record: dict[str, bytes | str] = {"__key__": key}
            record["json"] = json.dumps(sample.to_json(), sort_keys=True, ensure_ascii=False).encode("utf-8")
            for name, value in images.items():
                if isinstance(value, Image.Image):
                    record[name] = encode_image(value, name.rsplit(".", 1)[1], png_compress_level)
                else:
                    record[name] = bytes(value)
            writer.write(record)
            if on_sample is not None:
                on_sample(sample)
    finally:
        writer.close()
    if not seen:  # ShardWriter opens its first file eagerly; an empty run leaves an empty tar behind
        Path(first).unlink(missing_ok=True)
        return []
    return written


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
