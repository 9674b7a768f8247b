"""Skipping bad samples without losing count: the skip reasons, :class:`SkipSample` and :class:`SkipCounter`.

Every bad sample (or shard) is *counted* in a :class:`SkipCounter` by reason, logged at a limited rate, and
skipped -- never silently dropped and never fatal.
"""

from __future__ import annotations

import gzip
import logging
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: Reasons a sample (or a whole shard) can be skipped; ``SkipCounter`` accepts only these.
SKIP_REASONS = (
    "corrupt_image",  # the bytes are not a decodable image (or the image data is truncated)
    "unsupported_mode",  # decodes, but its pixel mode cannot be turned into RGB
    "decompression_bomb",  # width x height above the per-decode limit
    "missing_member",  # the JSON names an image member that the tar does not hold, or no JSON at all
    "missing_image",  # a converter's source row names an image file that does not exist
    "bad_json",  # the JSON does not parse (or nests too deep) or does not fit the Sample schema (types, fields)
    "bad_text",  # a string that cannot be UTF-8 encoded (lone surrogate) or holds an image token like <IMG_CONTEXT>
    "unsafe_member",  # a tar key or image member name with '..', an absolute path or characters outside the layout
    "duplicate_id",  # a sample id already seen in this pass (the first one is kept)
    "empty_side",  # query, positive or a negative has neither text nor image
    "truncated_shard",  # the tar ends early (interrupted copy/write); its complete samples are still read
    "corrupt_shard",  # not a tar at all (random bytes), a bad gzip stream, or a tar header with a bad checksum
    "missing_shard",  # the shard URL cannot be opened
    "duplicate_member",  # two tar members with the same key and extension, or a key that comes back later in a shard
    "shard_error",  # any other tar-level error
)


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
            # Damaged bytes (a header whose checksum fails, garbage where a header belongs, a gzip stream that does
            # not inflate) are told apart from an early end: both stop the shard, but the fixes differ.
            text = str(exn.args[0] if exn.args else exn)
            damaged = isinstance(exn, zlib.error | gzip.BadGzipFile) or any(
                m in text for m in ("bad checksum", "invalid header", "Error -3"))
            reason = "corrupt_shard" if damaged else "truncated_shard"
            if url in self._flagged_shards:
                return True
            self._flagged_shards.add(url)
        elif isinstance(exn, ValueError) and "duplicate file name" in str(exn):
            reason = "duplicate_member"
        else:
            reason = "shard_error"
        self.add(reason, where=url, detail=repr(exn))
        return True

    def flag_truncated(self, url: str, detail: str, reason: str = "truncated_shard") -> None:
        """Count ``url`` as a truncated (or, with ``reason="corrupt_shard"``, damaged) shard, once per pass."""
        if url not in self._flagged_shards:
            self._flagged_shards.add(url)
            self.add(reason, where=url, detail=detail)

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
