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
    # shards
    "write_shards": "shards",
    "decode_sample": "shards",
    "decode_samples": "shards",
    "decode_and_skip": "shards",
    "read_shard_samples": "shards",
    "shard_samples": "shards",
    "iter_decoded": "shards",
    "DecodedSample": "shards",
    "SkipCounter": "shards",
    "SkipSample": "shards",
    "SKIP_REASONS": "shards",
    "open_image": "shards",
    "to_rgb": "shards",
    "side_to_item": "shards",
    "expand_urls": "shards",
    "shards_by_dataset": "shards",
    "count_shards": "shards",
    "inspect_shards": "shards",
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
    "jsonl_to_shards": "converters",
    "normalize_llava": "converters",
    "resolve_instructions": "converters",
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
