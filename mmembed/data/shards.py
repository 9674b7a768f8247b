"""Writing and robustly reading WebDataset shards in the :mod:`mmembed.data.schema` layout.

Writing (:func:`write_shards`) is byte-reproducible: tar headers get a fixed mtime, owner and mode, members are
sorted by webdataset's ``TarWriter``, JSON is dumped with sorted keys and PIL images are PNG-encoded with fixed
settings, so identical input gives identical files.

Reading is built for long epochs over imperfect data: every bad sample is *counted* in a :class:`SkipCounter` (by
reason), logged at a limited rate, and skipped -- never silently dropped and never fatal. The pieces plug into a
``webdataset.DataPipeline``::

    counter = SkipCounter()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
        read_shard_samples(counter=counter),   # tar -> raw dicts; counts truncated/missing shards
        decode_and_skip(counter=counter),      # raw dicts -> DecodedSample; counts bad samples
    )

Each :class:`DecodedSample` carries the skips its worker counted since the previous sample (``skipped``), so counts
made inside DataLoader worker processes reach the main process with the data and can be summed and logged there.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import re
import tarfile
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image, ImageOps
from webdataset import tariterators

from mmembed.data.schema import Sample, Side
from mmembed.types import Item

log = logging.getLogger(__name__)

#: Per-decode pixel limit (width x height). Larger images are skipped as ``decompression_bomb``; PIL's global
#: ``Image.MAX_IMAGE_PIXELS`` is left alone. 50 MP fits an A4 page scanned at 600 dpi (~35 MP).
DEFAULT_MAX_PIXELS = 50_000_000

#: Reasons a sample (or a whole shard) can be skipped; ``SkipCounter`` accepts only these.
SKIP_REASONS = (
    "corrupt_image",  # the bytes are not a decodable image (or the image data is truncated)
    "unsupported_mode",  # decodes, but its pixel mode cannot be turned into RGB
    "decompression_bomb",  # width x height above the per-decode limit
    "missing_member",  # the JSON names an image member that the tar does not hold, or no JSON at all
    "missing_image",  # a converter's source row names an image file that does not exist
    "bad_json",  # the JSON does not parse or does not fit the Sample schema
    "empty_side",  # query, positive or a negative has neither text nor image
    "truncated_shard",  # the tar ends early (interrupted copy/write); its complete samples are still read
    "missing_shard",  # the shard URL cannot be opened
    "duplicate_member",  # two tar members with the same key and extension
    "shard_error",  # any other tar-level error
)

_IMAGE_MEMBER = re.compile(r"^(query|pos|neg\d+|xpos\d+)\.[a-z0-9]+$")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_SHARD_NAME = re.compile(r"^(.+)-(\d+)\.tar(?:\.gz)?$")
_ENCODE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}


class SkipSample(Exception):
    """Raised by the decoders for a sample that must be skipped; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; use one of {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Counts skipped samples by reason, logs them at a limited rate, and merges with other counters.

    Args:
        name: Shown in log lines (e.g. the DataModule's split).
        log_first: How many skips of each reason are logged individually (with their detail).
        log_every_s: After that, at most one summary line per this many seconds.
        strict: Re-raise instead of skipping (for debugging a converter or a test that wants the exception).
    """

    def __init__(self, name: str = "data", log_first: int = 3, log_every_s: float = 60.0, strict: bool = False):
        self.name = name
        self.log_first = log_first
        self.log_every_s = log_every_s
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self._new: Counter[str] = Counter()
        self._last_summary = time.monotonic()
        self._flagged_shards: set[str] = set()
        self._current_shard = ""  # set by open_shards: tar errors raised while reading it belong to it

    def add(self, reason: str, n: int = 1, *, where: str = "", detail: str = "") -> None:
        """Count ``n`` skips of ``reason`` (one of :data:`SKIP_REASONS`) and log within the rate limit."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; use one of {SKIP_REASONS}")
        self.counts[reason] += n
        self._new[reason] += n
        if self.counts[reason] <= self.log_first:
            log.warning("[%s] skipped (%s) %s %s", self.name, reason, where, detail[:300])
        elif time.monotonic() - self._last_summary >= self.log_every_s:
            self._last_summary = time.monotonic()
            log.warning("[%s] skipped so far: %s", self.name, dict(sorted(self.counts.items())))

    def handler(self, exn: BaseException) -> bool:
        """A webdataset exception handler: counts tar-level errors and tells webdataset to continue.

        A truncated shard is counted once per pass even when both the completeness check in
        :func:`open_shards` and tarfile itself report it.
        """
        if self.strict:
            raise exn
        # webdataset appends the url to some errors; errors raised inside a tar member carry only the stream
        url = exn.args[-1] if len(exn.args) > 1 and isinstance(exn.args[-1], str) else self._current_shard
        if isinstance(exn, FileNotFoundError | PermissionError | IsADirectoryError):
            reason = "missing_shard"
        elif isinstance(exn, tarfile.ReadError | tarfile.StreamError | EOFError | zlib.error | gzip.BadGzipFile):
            reason = "truncated_shard"
            if url in self._flagged_shards:
                return True
            self._flagged_shards.add(url)
        elif isinstance(exn, ValueError) and "duplicate file name" in str(exn):
            reason = "duplicate_member"
        else:
            reason = "shard_error"
        self.add(reason, where=url, detail=repr(exn))
        return True

    def flag_truncated(self, url: str, detail: str) -> None:
        """Count ``url`` as a truncated shard (once per pass; see :meth:`handler`)."""
        if url not in self._flagged_shards:
            self._flagged_shards.add(url)
            self.add("truncated_shard", where=url, detail=detail)

    def reopened(self, url: str) -> None:
        """Note that ``url`` is being read now, and forget that it was flagged, so a new pass counts again."""
        self._flagged_shards.discard(url)
        self._current_shard = url

    def take_new(self) -> dict[str, int]:
        """Return the counts added since the previous call and reset them (the per-sample ``skipped`` delta)."""
        new = dict(self._new)
        self._new.clear()
        return new

    def as_dict(self) -> dict[str, int]:
        """All counts so far, sorted by reason."""
        return dict(sorted(self.counts.items()))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipCounter | Mapping[str, int]) -> SkipCounter:
        """Add another counter's (or a plain dict's) counts into this one; returns ``self``."""
        for reason, n in (other.counts if isinstance(other, SkipCounter) else other).items():
            if n:
                self.counts[reason] += int(n)
        return self

    def __repr__(self) -> str:
        return f"SkipCounter({self.name!r}, {self.as_dict()})"


# ----------------------------------------------------------------------------------------------------------- writing
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
        if not _IMAGE_MEMBER.match(name):
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


# ----------------------------------------------------------------------------------------------------------- reading
def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand shard specs to a sorted list: brace patterns, globs, directories (their ``*.tar``) and plain paths.

    Raises:
        FileNotFoundError: When a local spec matches nothing (names the spec).
    """
    specs = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    urls: list[str] = []
    for s in map(str, specs):
        if s.startswith(("pipe:", "http://", "https://", "gs://", "s3://")):
            urls.extend(braceexpand.braceexpand(s))
            continue
        found: list[str] = []
        for part in braceexpand.braceexpand(s):
            if os.path.isdir(part):
                found.extend(sorted(glob.glob(os.path.join(part, "**", "*.tar*"), recursive=True)))
            elif any(c in part for c in "*?["):
                found.extend(sorted(glob.glob(part, recursive=True)))
            elif os.path.exists(part):
                found.append(part)
        if not found:
            raise FileNotFoundError(f"no shards match {s!r}; give a directory, a glob or a brace pattern of .tar files")
        urls.extend(found)
    return urls


def shards_by_dataset(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, list[str]]:
    """Group shards by the dataset in their file name (``{dataset}-{index:06d}.tar``, as every writer here names
    them), for per-dataset batching and mixture weights.

    Raises:
        ValueError: A file name that does not follow the convention (names it).
    """
    groups: dict[str, list[str]] = {}
    for url in expand_urls(spec):
        m = _SHARD_NAME.match(os.path.basename(url))
        if m is None:
            raise ValueError(f"{url}: shard names must be '{{dataset}}-{{index:06d}}.tar' to group them by dataset")
        groups.setdefault(m.group(1), []).append(url)
    return {name: sorted(urls) for name, urls in sorted(groups.items())}


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://") :]
    if url.startswith("file:"):
        return url[len("file:") :]
    return None if re.match(r"^[a-z0-9]+:", url) else url


def tar_is_complete(path: str | os.PathLike) -> bool:
    """Whether an uncompressed tar file ends the way tar writers end it (512-byte blocks, two zero blocks).

    Python's ``tarfile`` in stream mode silently treats a file cut at a header as a normal end, so this check is
    what makes an interrupted copy visible. Compressed files are reported complete (their decoder raises instead).
    """
    with open(path, "rb") as f:
        if f.read(2) in (b"\x1f\x8b", b"BZ", b"\xfd7"):
            return True
        size = f.seek(0, os.SEEK_END)
        if size == 0 or size % 512:
            return False
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def open_shards(src: Iterable[dict[str, Any]], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Open shard URLs (``{"url": ...}`` dicts), counting missing and truncated shards; yields ``url`` + ``stream``.

    A truncated local shard is counted and still read: its complete samples are good, and its last, partial
    sample is then counted as ``missing_member`` by :func:`decode_sample`.
    """
    for source in src:
        url = source["url"]
        counter.reopened(url)
        try:
            path = _local_path(url)
            if path is not None and not tar_is_complete(path):
                counter.flag_truncated(url, "file does not end with tar end-of-archive blocks")
            stream = wds.gopen(url)
        except Exception as exn:  # noqa: BLE001 -- routed to the counter like webdataset's own handlers
            exn.args = (*exn.args, url)
            counter.handler(exn)
            continue
        yield {**source, "stream": stream}


def shard_samples(
    src: Iterable[dict[str, Any]], counter: SkipCounter, select_files: Callable[[str], bool] | None = None
) -> Iterator[dict[str, Any]]:
    """Turn a stream of ``{"url": ...}`` dicts into raw webdataset samples, counting tar-level errors."""
    streams = open_shards(src, counter)
    files = tariterators.tar_file_expander(streams, handler=counter.handler, select_files=select_files)
    return tariterators.group_by_keys(files, handler=counter.handler)


#: Pipeline stage: ``read_shard_samples(counter=c)`` after a shard list (and node/worker splitting).
read_shard_samples = wds.pipelinefilter(shard_samples)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB: alpha is composited on white, 16/32-bit and float grey are rescaled.

    Raises:
        SkipSample: ``unsupported_mode`` when PIL cannot convert the mode.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    try:
        if mode.startswith("I") or mode == "F":
            arr = np.asarray(image, dtype=np.float64)
            if mode.startswith("I;16"):
                arr = arr / 257.0
            elif arr.size and (arr.min() < 0 or arr.max() > 255):
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) * (255.0 / (hi - lo or 1.0))
            return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
        if mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            if image.mode == "RGB":
                return image
            mode = "RGBA"
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return image.convert("RGB")
    except (ValueError, OSError, TypeError) as exn:
        raise SkipSample("unsupported_mode", f"mode {mode}: {exn}") from exn


def open_image(source: bytes | str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes (or a file) into a loaded RGB image, with EXIF rotation applied.

    Args:
        source: Encoded bytes or a path.
        max_pixels: Skip images with more than this many pixels (checked from the header, before decoding).

    Raises:
        SkipSample: ``corrupt_image``, ``decompression_bomb`` or ``unsupported_mode``.
    """
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source
    try:
        with warnings.catch_warnings():
            # our own limit below replaces PIL's process-wide one; keep its warning out of the logs
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
            w, h = image.size
            if w * h > max_pixels:
                raise SkipSample("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
            image.load()
    except Image.DecompressionBombError as exn:
        raise SkipSample("decompression_bomb", str(exn)) from exn
    except SkipSample:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as exn:  # UnidentifiedImageError is an OSError
        raise SkipSample("corrupt_image", repr(exn)) from exn
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 -- a broken EXIF block must not cost the sample; keep the unrotated image
        pass
    return to_rgb(image)


def decode_sample(
    raw: Mapping[str, Any], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Sample, dict[str, Image.Image]]:
    """Decode one raw webdataset sample (``{"__key__", "json", "query.png", ...}``) into a Sample and RGB images.

    Returns:
        The :class:`Sample` and a dict from member name (``"query.png"``) to its decoded RGB image.

    Raises:
        SkipSample: With the reason the sample cannot be used.
    """
    data = raw.get("json")
    if data is None:
        raise SkipSample("missing_member", "no .json member")
    try:
        sample = Sample.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError, AttributeError) as exn:
        raise SkipSample("bad_json", repr(exn)) from exn
    sides: list[Side] = sample.sides
    for side in sides:
        if side.kind not in ("natural", "document"):
            raise SkipSample("bad_json", f"side kind {side.kind!r} is not 'natural' or 'document'")
        if side.is_empty:
            raise SkipSample("empty_side", "a side has neither text nor image")
    images: dict[str, Image.Image] = {}
    for side in sides:
        if side.image is None or side.image in images:
            continue
        payload = raw.get(side.image, raw.get(side.image.lower()))
        if payload is None:
            raise SkipSample("missing_member", f"no member {side.image!r}")
        images[side.image] = open_image(payload, max_pixels=max_pixels)
    return sample, images


def side_to_item(side: Side, images: Mapping[str, Image.Image]) -> Item:
    """The :class:`mmembed.types.Item` for one side, with its decoded image attached."""
    return Item(
        text=side.text,
        image=images[side.image] if side.image is not None else None,
        instruction=side.instruction,
        kind=side.kind,  # type: ignore[arg-type]  # validated in decode_sample
    )


@dataclass
class DecodedSample:
    """A decoded training sample as it leaves :func:`decode_samples`.

    Attributes:
        sample: The schema sample (JSON fields).
        images: Member name -> RGB image.
        key: The tar key.
        url: The shard it came from.
        skipped: Skips counted in this worker since the previous yielded sample (sum these across a batch).
    """

    sample: Sample
    images: dict[str, Image.Image]
    key: str = ""
    url: str = ""
    skipped: dict[str, int] = field(default_factory=dict)

    def items(self) -> tuple[Item, Item, list[Item]]:
        """``(query, positive, negatives)`` as Items ready for a processor/collate."""
        s = self.sample
        return (
            side_to_item(s.query, self.images),
            side_to_item(s.positive, self.images),
            [side_to_item(n, self.images) for n in s.negatives],
        )

    def extra_positive_items(self) -> list[Item]:
        """The judge-identified extra positives as Items (empty for shards without stage-3 curation)."""
        return [side_to_item(p, self.images) for p in self.sample.extra_positives]


def decode_samples(
    src: Iterable[Mapping[str, Any]], counter: SkipCounter | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[DecodedSample]:
    """Decode raw samples, skipping (and counting) the bad ones; a ``webdataset`` pipeline stage.

    Args:
        src: Raw samples from :func:`shard_samples` / ``wds.tarfile_to_samples``.
        counter: Where skips are counted (a fresh one if None).
        max_pixels: Per-image pixel limit, see :func:`open_image`.
    """
    counter = counter if counter is not None else SkipCounter()
    start = Counter(counter.counts)
    for raw in src:
        key, url = str(raw.get("__key__", "")), str(raw.get("__url__", ""))
        try:
            sample, images = decode_sample(raw, max_pixels=max_pixels)
        except SkipSample as skip:
            if counter.strict:
                raise
            counter.add(skip.reason, where=f"{url}:{key}", detail=skip.detail)
            continue
        yield DecodedSample(sample, images, key=key, url=url, skipped=counter.take_new())
    this_pass = Counter(counter.counts)
    this_pass.subtract(start)
    if any(v > 0 for v in this_pass.values()):
        log.warning("[%s] pass finished; skipped %s", counter.name, {k: v for k, v in this_pass.items() if v > 0})


#: Pipeline stage: ``decode_and_skip(counter=c)`` after :data:`read_shard_samples`.
decode_and_skip = wds.pipelinefilter(decode_samples)


def iter_decoded(
    urls: str | Sequence[str], counter: SkipCounter | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[DecodedSample]:
    """Iterate decoded samples of shards in order, in this process (for tools, mining and tests)."""
    counter = counter if counter is not None else SkipCounter()
    urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        read_shard_samples(counter=counter),
        decode_and_skip(counter=counter, max_pixels=max_pixels),
    )
    yield from pipeline


# ------------------------------------------------------------------------------------------------------------ tools
def count_shards(urls: str | Sequence[str], counter: SkipCounter | None = None) -> dict[str, Any]:
    """Count samples per dataset, task and meta-task by reading only the JSON members.

    Returns:
        ``{"shards", "samples", "by_dataset": {name: n}, "by_task": {...}, "by_meta_task": {...},
        "by_shard": {url: n}, "skipped": {reason: n}}``.
    """
    counter = counter if counter is not None else SkipCounter("count")
    urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
    by: dict[str, Counter[str]] = {k: Counter() for k in ("by_dataset", "by_task", "by_meta_task", "by_shard")}
    raws = shard_samples(({"url": u} for u in urls), counter, select_files=lambda f: f.endswith(".json"))
    for raw in raws:
        try:
            d = json.loads(raw["json"])
            sample = Sample.from_json(d)
        except KeyError:
            counter.add("missing_member", where=raw.get("__key__", ""), detail="no .json member")
            continue
        except (ValueError, TypeError, AttributeError) as exn:
            counter.add("bad_json", where=raw.get("__key__", ""), detail=repr(exn))
            continue
        by["by_dataset"][sample.dataset] += 1
        by["by_task"][sample.task] += 1
        by["by_meta_task"][sample.meta_task] += 1
        by["by_shard"][raw.get("__url__", "")] += 1
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
