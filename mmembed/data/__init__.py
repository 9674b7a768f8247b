"""Data layer: the sample schema, shard writing/reading, eval-set readers, converters and the synthetic world.

Public names are re-exported lazily (PEP 562), so ``import mmembed.data.schema`` does not pull in webdataset
(and with it torch) or pyarrow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # schema
    "Sample": "schema",
    "Side": "schema",
    "TASKS": "schema",
    "META_TASKS": "schema",
    "SchemaError": "schema",
    # images
    "image_size": "images",
    "DEFAULT_MAX_PIXELS": "images",
    # shards
    "validate_raw": "decode",
    "parse_sample": "decode",
    "write_shards": "writing",
    "decode_sample": "decode",
    "decode_samples": "decode",
    "decode_and_skip": "decode",
    "read_shard_samples": "reading",
    "shard_samples": "reading",
    "iter_decoded": "reading",
    "DecodedSample": "decode",
    "SkipCounter": "skips",
    "SkipSample": "skips",
    "SKIP_REASONS": "skips",
    "open_image": "images",
    "to_rgb": "images",
    "side_to_item": "decode",
    "expand_urls": "reading",
    "shards_by_dataset": "reading",
    "count_shards": "inspection",
    "inspect_shards": "inspection",
    # eval sets
    "read_mmeb": "evalsets",
    "load_mmeb_suite": "evalsets",
    "MMEBSubset": "evalsets",
    "MMEBRow": "evalsets",
    "read_beir_visdoc": "evalsets",
    "load_visdoc_suite": "evalsets",
    "VisDocSet": "evalsets",
    "split_legacy_text": "evalsets",
    # converters
    "mmeb_train_to_shards": "converters",
    "visdoc_beir_to_shards": "converters",
    "visdoc_pairs_to_shards": "converters",
    "jsonl_to_shards": "jsonl",
    "normalize_llava": "llava",
    "resolve_instructions": "convert_common",
    "ConvertReport": "converters",
    # synthetic world
    "generate_synth": "synth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mmembed.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mmembed.data.{module}"), "generate" if name == "generate_synth" else name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
