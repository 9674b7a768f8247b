"""The internvl3_* presets equal the released InternVL3-*-hf configs on every field the kit knows (PUBLISHED)."""

from __future__ import annotations

import pytest

from mmembed.backbone.model import load_processor
from mmembed.backbone.presets import PRESETS, PUBLISHED, SOURCES


def _field(name: str, config, tokenizer, image_processor):
    group, _, attr = name.partition(".")
    if group == "config":
        return getattr(config, attr)
    if group == "text":
        if attr.startswith("rope."):
            return config.text_config.rope_parameters[attr.split(".", 1)[1]]
        return getattr(config.text_config, attr)
    if group == "vision":
        return getattr(config.vision_config, attr)
    if group == "tokenizer":
        return getattr(tokenizer, attr)
    if group == "token":
        return tokenizer.convert_tokens_to_ids(attr)
    if group == "image_processor":
        value = getattr(image_processor, attr)
        return dict(value) if attr == "size" else value
    raise AssertionError(f"unknown field group in {name!r}")


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_matches_published_fields(preset):
    processor, config = load_processor(preset, vtc_factor=1)
    mismatched = {}
    for name, (value, source) in PUBLISHED[preset].items():
        assert source in SOURCES, f"{name}: source {source!r} is not in SOURCES"
        got = _field(name, config, processor.tokenizer, processor.image_processor)
        got = list(got) if isinstance(got, tuple) else got
        if got != value:
            mismatched[name] = (got, value)
    assert not mismatched, f"{preset}: preset differs from the published config: {mismatched}"
    assert config.get_text_config().vocab_size >= len(processor.tokenizer) - 1  # only <video> may lie beyond it
    assert processor.image_seq_length == 256  # native InternVL3: 256 tokens per 448px tile


def test_every_real_size_preset_has_a_published_entry_and_small_presets_stay_small():
    assert {n for n in PRESETS if n.startswith("internvl3_")} == set(PUBLISHED)
    for small in ("tiny", "small", "mini"):
        processor, config = load_processor(small)
        assert len(processor.tokenizer) < 5000 and config.text_config.vocab_size < 5000
        tok = processor.tokenizer  # same special tokens and template, at small ids
        assert tok.eos_token == "<|im_end|>" and tok.model_max_length == 8192
        assert config.image_token_id == tok.context_image_token_id
