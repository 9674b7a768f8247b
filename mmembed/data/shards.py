"""One import point for the shard layer, whose parts live in files that each do one thing:

* :mod:`mmembed.data.writing` -- :func:`write_shards` (byte-reproducible), :func:`encode_image`, :func:`sample_key`
* :mod:`mmembed.data.reading` -- :func:`expand_urls`, :func:`shards_by_dataset`, tar completeness, member grouping,
  the :data:`read_shard_samples` pipeline stage, :func:`iter_decoded`
* :mod:`mmembed.data.decode` -- the one schema check (:func:`validate_raw`), :func:`decode_sample`,
  :class:`DecodedSample` and the :data:`decode_and_skip` pipeline stage
* :mod:`mmembed.data.images` -- the one image decoder (:func:`open_image`, :func:`to_rgb`, the pixel limit)
* :mod:`mmembed.data.skips` -- skip reasons, :class:`SkipSample`, :class:`SkipCounter`
* :mod:`mmembed.data.inspection` -- :func:`count_shards`, :func:`inspect_shards`
"""

from __future__ import annotations

from mmembed.data.decode import (
    DecodedSample,
    decode_and_skip,
    decode_sample,
    decode_samples,
    parse_sample,
    side_to_item,
    validate_raw,
)
from mmembed.data.images import DEFAULT_MAX_PIXELS, image_size, open_image, to_rgb
from mmembed.data.inspection import count_shards, inspect_shards
from mmembed.data.reading import (
    expand_urls,
    group_members,
    iter_decoded,
    open_shards,
    read_shard_samples,
    shard_samples,
    shards_by_dataset,
    tar_is_complete,
)
from mmembed.data.skips import SKIP_REASONS, SkipCounter, SkipSample
from mmembed.data.writing import encode_image, sample_key, write_shards

__all__ = [
    "DEFAULT_MAX_PIXELS", "SKIP_REASONS", "DecodedSample", "SkipCounter", "SkipSample", "count_shards",
    "decode_and_skip", "decode_sample", "decode_samples", "encode_image", "expand_urls", "group_members",
    "image_size", "inspect_shards", "iter_decoded", "open_image", "open_shards", "parse_sample", "read_shard_samples",
    "sample_key", "shard_samples", "shards_by_dataset", "side_to_item", "tar_is_complete", "to_rgb",
    "validate_raw", "write_shards",
]
