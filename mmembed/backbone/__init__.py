"""The VTC InternVL3 backbone: presets, loading, compression, tiling, templates, pooling, fine-tuning modes.

Names are resolved lazily (PEP 562), so light modules do not pull in transformers. The prompt templates and
instruction tables live in ``mmembed.prompts`` (``instructions_for`` is re-exported here).
"""

from __future__ import annotations

import importlib

_HOMES = {
    "FinetuneConfig": "finetune", "apply_finetuning": "finetune",
    "InputBuilder": "inputs", "TilePolicy": "inputs", "load_image": "inputs",
    "VTCBackbone": "model", "build_backbone": "model", "build_input_builder": "model", "load_processor": "model",
    "last_token_pool": "pooling", "PRESETS": "presets", "instructions_for": "templates",
    "apply_vtc": "vtc", "bilinear_downsample": "vtc", "tokens_per_tile": "vtc",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
