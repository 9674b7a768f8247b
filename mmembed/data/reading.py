"""Reading WebDataset shards robustly: URL expansion, completeness checks, member grouping, decoded iteration.

The pieces plug into a ``webdataset.DataPipeline``::

    counter = SkipCounter()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
        read_shard_samples(counter=counter),   # tar -> raw dicts; counts truncated/missing shards
        decode_and_skip(counter=counter),      # raw dicts -> DecodedSample; counts bad samples
    )

Each :class:`~mmembed.data.decode.DecodedSample` carries the skips its worker counted since the previous sample
(``skipped``), so counts made inside DataLoader worker processes reach the main process with the data.
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import braceexpand
import webdataset as wds
from webdataset import tariterators

from mmembed.data.decode import DUPLICATE_FLAG, DecodedSample, decode_and_skip
from mmembed.data.images import DEFAULT_MAX_PIXELS
from mmembed.data.skips import SkipCounter

_SHARD_NAME = re.compile(r"^(.+)-(\d+)\.tar(?:\.gz)?$")


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


def tar_damage(path: str | os.PathLike) -> tuple[int, str] | None:
    """Where and why a local shard is damaged, from its tar headers: ``(offset, detail)``, or ``None``.

    Tells damaged shards from truncated ones: random bytes (no tar header where the first one belongs), a gzip stream
    that does not inflate, or a tar header whose checksum fails (a flipped byte). An uncompressed tar's headers are
    all walked (one 512-byte read per member; the data is skipped), because ``tarfile`` in stream mode takes a bad
    header after the first for the end of the archive and drops the rest of the shard without a word. A gzipped
    shard is checked at its first header (damage further in raises while it is read). An early end is not damage
    here (see :func:`tar_is_complete`).
    """
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            f.seek(0)
            try:
                with gzip.GzipFile(fileobj=f) as g:
                    return _header_damage(g.read(tarfile.BLOCKSIZE), 0)
            except EOFError:
                return None  # a gzip stream cut short: truncated
            except (OSError, zlib.error) as exn:
                return 0, f"bad gzip stream ({exn})"
        offset = 0
        while True:
            f.seek(offset)
            block = f.read(tarfile.BLOCKSIZE)
            damage = _header_damage(block, offset)
            if damage is not None or len(block) < tarfile.BLOCKSIZE or not any(block):
                return damage  # damaged, cut inside a header (truncated), or the end-of-archive blocks
            size = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape").size
            offset += tarfile.BLOCKSIZE * (1 + (size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE)


def _header_damage(block: bytes, offset: int) -> tuple[int, str] | None:
    if len(block) < tarfile.BLOCKSIZE or not any(block):
        return None
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exn:
        if block[257:262] == b"ustar":
            return offset, f"bad tar header checksum at offset {offset} ({exn})"
        if offset == 0:
            return offset, f"not a tar archive: the first 512 bytes are no tar header ({exn})"
        return offset, f"no valid tar header at offset {offset} ({exn})"
    return None


def open_shards(src: Iterable[dict[str, Any]], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Open shard URLs (``{"url": ...}`` dicts), counting missing and truncated shards; yields ``url`` + ``stream``.

    A truncated local shard is counted and still read: its complete samples are good, and its last, partial
    sample is then counted as ``missing_member`` by :func:`decode_sample`. A damaged local file (:func:`tar_damage`)
    is counted as ``corrupt_shard``; its members before the damage are read, as a truncated shard's are.
    """
    for source in src:
        url = source["url"]
        counter.reopened(url)
        try:
            path = _local_path(url)
            damage = tar_damage(path) if path is not None else None
            if damage is not None:
                counter.flag_truncated(url, damage[1], reason="corrupt_shard")
                if damage[0] == 0:
                    continue  # nothing readable; further in, the members before the damage are still good
            elif path is not None and not tar_is_complete(path):
                counter.flag_truncated(url, "file does not end with tar end-of-archive blocks")
            stream = wds.gopen(url)
        except Exception as exn:  # noqa: BLE001 -- routed to the counter like webdataset's own handlers
            exn.args = (*exn.args, url)
            counter.handler(exn)
            continue
        yield {**source, "stream": stream}


def group_members(files: Iterable[dict[str, Any]], handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    """Group tar members into raw samples by key (``K.json``, ``K.pos.png`` -> ``{"__key__": "K", ...}``).

    Written here rather than using ``webdataset.tariterators.group_by_keys`` because that one, on a repeated
    member, raises mid-sample and then still yields the sample, and it yields a key that comes back later in the
    same shard a second time; here such samples are flagged (:data:`~mmembed.data.decode.DUPLICATE_FLAG`) so the
    one validation step skips and counts them as ``duplicate_member``.
    """
    current: dict[str, Any] | None = None
    seen_keys: set[str] = set()
    url = None
    for member in files:
        try:
            if not member:  # webdataset's end-of-shard marker
                if current is not None:
                    yield current
                current = None
                continue
            fname, data = member["fname"], member["data"]
            if member.get("__url__") != url:
                url, seen_keys = member.get("__url__"), set()
            prefix, suffix = tariterators.base_plus_ext(fname)
            if prefix is None:
                continue
            suffix = suffix.lower()
            if current is None or prefix != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": prefix, "__url__": url}
                if prefix in seen_keys:
                    current[DUPLICATE_FLAG] = f"key {prefix[:80]!r} comes back later in the shard"
                seen_keys.add(prefix)
            if suffix in current:
                current[DUPLICATE_FLAG] = f"two members named {fname[:80]!r}"
                continue
            current[suffix] = data
        except Exception as exn:  # noqa: BLE001 -- routed to the counter like webdataset's own handlers
            if not handler(exn):
                break
    if current is not None:
        yield current


def shard_samples(
    src: Iterable[dict[str, Any]], counter: SkipCounter, select_files: Callable[[str], bool] | None = None
) -> Iterator[dict[str, Any]]:
    """Turn a stream of ``{"url": ...}`` dicts into raw webdataset samples, counting tar-level errors."""
    streams = open_shards(src, counter)
    files = tariterators.tar_file_expander(streams, handler=counter.handler, select_files=select_files)
    return group_members(files, counter.handler)


#: Pipeline stage: ``read_shard_samples(counter=c)`` after a shard list (and node/worker splitting).
read_shard_samples = wds.pipelinefilter(shard_samples)


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
