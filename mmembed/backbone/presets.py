"""Model presets: exact published InternVL3 shapes (random init) and small CPU shapes.

Each preset is a pair of plain dicts (vision / text sub-configs) turned into a stock ``InternVLConfig``. Published
shapes follow the ``OpenGVLab/InternVL3-*-hf`` configs: InternViT-300M-448px-V2_5 vision tower with a Qwen2 /
Qwen2.5 language model. ``PUBLISHED`` lists, field by field, what is known of the released folders and where each
value comes from; ``tests/test_presets.py`` checks the ``internvl3_*`` presets (config, tokenizer, image processor)
against it. Fields not listed there are not claimed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import InternVLConfig

INTERNVIT_300M = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=[448, 448],
    patch_size=[14, 14], norm_type="layer_norm", use_qk_norm=False, layer_scale_init_value=0.1, hidden_act="gelu",
    attention_bias=True, use_mean_pooling=True,
)
_QWEN_COMMON = dict(model_type="qwen2", vocab_size=151674, max_position_embeddings=32768, rope_theta=1_000_000.0,
                    rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=151643, eos_token_id=151645)
QWEN_SPECIAL_IDS_FROM = 151643  # real-size presets put the offline tokenizer's special tokens at their released ids


@dataclass(frozen=True)
class Preset:
    """A named backbone shape.

    Attributes:
        vision: kwargs for ``InternVLVisionConfig``.
        text: kwargs for the Qwen2 text config (``vocab_size`` may be ``None``: the offline tokenizer's size).
        tokenizer_vocab: size of the offline BPE vocabulary built for this preset.
        special_ids_from: id of the offline tokenizer's first special token (``None``: right after the BPE
            vocabulary, keeping small presets small; 151643 for real-size presets, so ids match the released ones).
        extra: other ``InternVLConfig`` fields.
    """

    vision: dict[str, Any]
    text: dict[str, Any]
    tokenizer_vocab: int = 2048
    special_ids_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ``small``'s parts, shared by the presets built on it (tile size and patch differ).
_SMALL_TOWER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    attention_bias=True, layer_scale_init_value=0.1)
_SMALL_LM = dict(model_type="qwen2", vocab_size=None, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, max_position_embeddings=4096, rope_theta=10000.0,
                 tie_word_embeddings=True)

PRESETS: dict[str, Preset] = {
    # CPU unit tests: well under a second per training step. 64px tiles, patch 8 -> 8x8 grid -> 16 native tokens.
    "tiny": Preset(
        vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=[64, 64], patch_size=[8, 8], attention_bias=True, layer_scale_init_value=0.1),
        text=dict(model_type="qwen2", vocab_size=None, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096, rope_theta=10000.0,
                  tie_word_embeddings=True),
    ),
    # ``tiny`` with a 128-wide, 4-layer LLM and a 64-wide vision tower (same 64px tiles and vocabulary): the smallest
    # shape found that learns the judge's yes/no comparisons on CPU (the 64-wide, 2-layer ``tiny`` LM stays at chance
    # on them; see docs/judge.md). Used for the stage-1 judge and the miniature reproduction (docs/reproduction.md).
    "small": Preset(vision=dict(_SMALL_TOWER, image_size=[64, 64], patch_size=[8, 8]), text=dict(_SMALL_LM)),
    # ``small``'s language model behind real InternVL tiling (224px / 448px tiles, patch 14): 64 / 256 native tokens
    # per tile, so visual tokens are most of a sample (a 4-tile page + thumbnail: 320 / 1280 of them) as in the real
    # model, and page text is legible. Table 9's quality and speed-up at a realistic visual share on CPU (issue 23).
    "small_224": Preset(vision=dict(_SMALL_TOWER, image_size=[224, 224], patch_size=[14, 14]), text=dict(_SMALL_LM)),
    "small_448": Preset(vision=dict(_SMALL_TOWER, image_size=[448, 448], patch_size=[14, 14]), text=dict(_SMALL_LM)),
    # Shaped like InternVL3-2B (real 448px/14 tiling, 256 native tokens per tile, LLM much larger than the vision
    # tower) yet small enough to time on CPU.
    "mini": Preset(
        vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    image_size=[448, 448], patch_size=[14, 14], attention_bias=True, layer_scale_init_value=0.1),
        text=dict(model_type="qwen2", vocab_size=None, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=2, intermediate_size=1536, max_position_embeddings=8192, rope_theta=10000.0,
                  tie_word_embeddings=True),
    ),
    # ``mini`` with what decides the VTC speed-up at 2B scale kept (used by ``benchmarks/ --mini-shape
    # 2b-proportional``): the vision tower's cost per tile is about the LLM's cost on one native tile's 256 tokens
    # (InternViT-300M on 1025 patches vs Qwen2.5-1.5B), 128-wide LLM heads with 6:1 grouped-query attention and a
    # 5.83x MLP, 64-wide vision heads with a 4x MLP. Widths are half of InternVL3-2B's, depths two layers.
    "mini_2b_proportional": Preset(
        vision=dict(hidden_size=448, num_hidden_layers=2, num_attention_heads=7, intermediate_size=1792,
                    image_size=[448, 448], patch_size=[14, 14], attention_bias=True, layer_scale_init_value=0.1),
        text=dict(model_type="qwen2", vocab_size=None, hidden_size=768, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=1, intermediate_size=4480, max_position_embeddings=8192, rope_theta=10000.0,
                  tie_word_embeddings=True),
    ),
    "internvl3_1b": Preset(
        vision=INTERNVIT_300M,
        text=dict(_QWEN_COMMON, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        special_ids_from=QWEN_SPECIAL_IDS_FROM,
    ),
    "internvl3_2b": Preset(
        vision=INTERNVIT_300M,
        text=dict(_QWEN_COMMON, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True),
        special_ids_from=QWEN_SPECIAL_IDS_FROM,
    ),
    "internvl3_8b": Preset(
        vision=INTERNVIT_300M,
        text=dict(_QWEN_COMMON, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False),
        special_ids_from=QWEN_SPECIAL_IDS_FROM,
    ),
}

# Where the published values come from. Keys of ``PUBLISHED`` entries name a field: ``config.<attr>`` /
# ``text.<attr>`` / ``vision.<attr>`` on the ``InternVLConfig`` (``text.rope.<key>`` inside ``rope_parameters``),
# ``tokenizer.<attr>``, ``token.<string>`` (its id), ``image_processor.<attr>``.
SOURCES = {
    "convert": "transformers src/transformers/models/internvl/convert_internvl_weights_to_hf.py (image_token_id "
               "151667 for Qwen2 models, eos forced to 151645 for InternVL3, CONTEXT_LENGTH 8192, the tokenizer's "
               "added tokens, GotOcr2ImageProcessorFast 448x448 with ImageNet mean/std and default max_patches 12)",
    "qwen": "Qwen2/Qwen2.5 tokenizer and config: <|endoftext|> 151643 (= bos_token_id), <|im_start|> 151644, "
            "<|im_end|> 151645; vocab 151674 after InternVL's 9 added tokens",
    "card": "OpenGVLab/InternVL3-*-hf config.json as recorded in /work/shared/STACK.md (2026-11-30): InternVL3-1B "
            "LM head untied, rope_scaling dynamic factor 2.0; text shapes per model",
}
_COMMON_PUBLISHED = {
    "config.image_token_id": (151667, "convert"),
    "config.downsample_ratio": (0.5, "convert"),
    "text.vocab_size": (151674, "qwen"),
    "text.bos_token_id": (151643, "qwen"),
    "text.eos_token_id": (151645, "convert"),
    "vision.hidden_size": (1024, "card"),
    "vision.num_hidden_layers": (24, "card"),
    "vision.image_size": ([448, 448], "convert"),
    "vision.patch_size": ([14, 14], "card"),
    "tokenizer.model_max_length": (8192, "convert"),
    "tokenizer.eos_token": ("<|im_end|>", "convert"),
    "token.<|endoftext|>": (151643, "qwen"),
    "token.<|im_start|>": (151644, "qwen"),
    "token.<|im_end|>": (151645, "qwen"),
    "token.<img>": (151665, "convert"),
    "token.</img>": (151666, "convert"),
    "token.<IMG_CONTEXT>": (151667, "convert"),
    "token.</box>": (151673, "convert"),
    "image_processor.size": ({"height": 448, "width": 448}, "convert"),
    "image_processor.max_patches": (12, "convert"),
    "image_processor.min_patches": (1, "convert"),
    "image_processor.image_mean": ([0.485, 0.456, 0.406], "convert"),
    "image_processor.image_std": ([0.229, 0.224, 0.225], "convert"),
}
#: Field -> (published value, key of ``SOURCES``), per real-size preset.
PUBLISHED: dict[str, dict[str, tuple[Any, str]]] = {
    "internvl3_1b": {**_COMMON_PUBLISHED, "text.hidden_size": (896, "card"), "text.num_hidden_layers": (24, "card"),
                     "text.num_attention_heads": (14, "card"), "text.num_key_value_heads": (2, "card"),
                     "text.intermediate_size": (4864, "card"), "text.tie_word_embeddings": (False, "card"),
                     "config.tie_word_embeddings": (False, "card"), "text.rope.rope_type": ("dynamic", "card"),
                     "text.rope.factor": (2.0, "card")},
    "internvl3_2b": {**_COMMON_PUBLISHED, "text.hidden_size": (1536, "card"), "text.num_hidden_layers": (28, "card"),
                     "text.num_attention_heads": (12, "card"), "text.num_key_value_heads": (2, "card"),
                     "text.intermediate_size": (8960, "card")},
    "internvl3_8b": {**_COMMON_PUBLISHED},
}


def preset_config(name: str, vocab_size: int, image_token_id: int) -> InternVLConfig:
    """Build the stock ``InternVLConfig`` for a preset.

    Args:
        name: a key of ``PRESETS``.
        vocab_size: used when the preset's text vocab is not fixed (small presets use the offline tokenizer's size).
        image_token_id: id of ``<IMG_CONTEXT>`` in the tokenizer that goes with this model.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or pass a local checkpoint folder")
    p = PRESETS[name]
    text = dict(p.text)
    if text.get("vocab_size") is None:
        text["vocab_size"] = vocab_size
    tie = text.get("tie_word_embeddings", True)
    return InternVLConfig(
        vision_config=dict(p.vision),
        text_config=text,
        image_token_id=image_token_id,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie,
        **p.extra,
    )
