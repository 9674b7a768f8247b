"""VTC, presets, tiling, templates, pooling and fine-tuning modes on the real transformers code path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import InternVLForConditionalGeneration

from mmembed import Item
from mmembed.backbone import (
    FinetuneConfig,
    TilePolicy,
    bilinear_downsample,
    build_backbone,
    build_input_builder,
    instructions_for,
    last_token_pool,
    load_processor,
    tokens_per_tile,
)
from mmembed.backbone.presets import preset_config
from mmembed.backbone.tokenizer import build_tokenizer
from mmembed.prompts.embedding import format_item_text

from .conftest import make_image


def test_bilinear_half_equals_2x2_average_pooling():
    x = torch.randn(2, 8, 8, 5)
    y = bilinear_downsample(x, 2)
    ref = F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert y.shape == (2, 4, 4, 5)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("name", ["internvl3_1b", "internvl3_2b", "internvl3_8b", "mini"])
def test_published_tokens_per_tile(name):
    cfg = preset_config(name, vocab_size=1000, image_token_id=5)
    assert [tokens_per_tile(cfg, s) for s in (1, 2, 4)] == [256, 64, 16]


def test_published_shapes():
    c2 = preset_config("internvl3_2b", 1000, 5)
    t = c2.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size) == (1536, 28, 151674)
    assert (c2.vision_config.hidden_size, c2.vision_config.num_hidden_layers) == (1024, 24)
    c8 = preset_config("internvl3_8b", 1000, 5)
    assert (c8.text_config.hidden_size, c8.text_config.num_key_value_heads) == (3584, 4)


def test_unknown_preset_and_bad_factor():
    with pytest.raises(ValueError, match="unknown preset"):
        load_processor("no_such_preset")
    with pytest.raises(ValueError, match="vtc_factor=3"):
        load_processor("tiny", vtc_factor=3)


def test_processor_token_count_must_match_factor():
    proc, _ = load_processor("tiny", vtc_factor=2)
    assert proc.image_seq_length == 4  # 8x8 grid -> /2 -> shuffle -> 2x2
    with pytest.raises(ValueError, match="vtc_factor=2 gives 4"):
        load_processor("tiny", vtc_factor=2, image_seq_length=16)


def test_vtc_factor1_is_stock_internvl_and_placements_differ():
    native = build_backbone("tiny", vtc_factor=1, seed=3)
    pix = torch.randn(2, 3, 64, 64)
    stock = InternVLForConditionalGeneration(native.config)
    stock.load_state_dict(native.hf_model.state_dict())
    assert "pixel_shuffle" not in native.internvl.__dict__
    ref = stock.model.get_image_features(pix, vision_feature_layer=-1, vision_feature_select_strategy="default")
    got = native.internvl.get_image_features(pix, vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.testing.assert_close(got.pooler_output, ref.pooler_output)
    assert got.pooler_output.shape[1] == 16
    pre = build_backbone("tiny", vtc_factor=2, vtc_placement="pre_shuffle", seed=3)
    post = build_backbone("tiny", vtc_factor=2, vtc_placement="post_shuffle", seed=3)
    f_pre = pre.internvl.get_image_features(pix, vision_feature_layer=-1, vision_feature_select_strategy="default")
    f_post = post.internvl.get_image_features(pix, vision_feature_layer=-1, vision_feature_select_strategy="default")
    assert f_pre.pooler_output.shape == f_post.pooler_output.shape == (2, 4, 64)
    assert not torch.allclose(f_pre.pooler_output, f_post.pooler_output)
    # Parameter-free: compression adds no state-dict key.
    assert pre.hf_model.state_dict().keys() == native.hf_model.state_dict().keys()


@pytest.mark.parametrize(("factor", "natural", "document"), [(2, 64, 320), (1, 256, 1280), (4, 16, 80)])
def test_tiling_policy_token_counts_at_448(factor, natural, document):
    b = build_input_builder("mini", vtc_factor=factor)
    assert b.num_visual_tokens(Item(image=make_image(448, 448))) == natural
    # A 2x2-tile page: 4 tiles + thumbnail.
    assert b.num_visual_tokens(Item(image=make_image(896, 896), kind="document")) == document
    assert b.num_visual_tokens(Item(text="no image")) == 0


def test_tile_policy_override():
    b = build_input_builder("mini", vtc_factor=2, tile_policy={"natural": 1, "document": 1})
    assert b.num_visual_tokens(Item(image=make_image(896, 896), kind="document")) == 64
    with pytest.raises(ValueError, match="tile caps"):
        TilePolicy(natural=0)


def test_instruction_tables_lookup():
    assert instructions_for("ImageNet_1K") == ("Represent the given image for classification.",
                                               "Represent the given text.")
    q, t = instructions_for("MSCOCO", task="t2i")
    assert q == "Find me an everyday image that matches the given query." and t == "Represent the given image."
    assert instructions_for("MSCOCO")[1] == "Represent the cropped image."  # the grounding subset
    with pytest.raises(KeyError, match="pass query/target instructions"):
        instructions_for("NotADataset")


def test_templates_follow_paper():
    q = format_item_text("a cat", "Find it.", True, "query", "<IMG_CONTEXT>")
    assert q == "Instruct: Find it. <IMG_CONTEXT>\nQuery: a cat"
    c = format_item_text("a cat", "Represent the given text.", False, "candidate", "<IMG_CONTEXT>")
    assert c == "Instruct: Represent the given text. Text: a cat"


def test_last_token_pool_left_and_right_padding():
    h = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(last_token_pool(h, right, normalize=False), torch.stack([h[0, 1], h[1, 3]]))
    torch.testing.assert_close(last_token_pool(h, left, normalize=False), torch.stack([h[0, 3], h[1, 3]]))
    assert torch.allclose(last_token_pool(h, right).norm(dim=-1), torch.ones(2))


def test_tokenizer_deterministic_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    a.save_pretrained(tmp_path)
    c = AutoTokenizer.from_pretrained(tmp_path)
    text = "Instruct: Find a red circle <IMG_CONTEXT> Query: two blue stars"
    assert c(text)["input_ids"] == a(text)["input_ids"]
    assert c.context_image_token_id == a.context_image_token_id
    assert a.convert_ids_to_tokens(a.context_image_token_id) == "<IMG_CONTEXT>"


def _trainable(m):
    return [n for n, p in m.named_parameters() if p.requires_grad]


def test_lora_targets_language_model_only():
    bb = build_backbone("tiny", finetune=FinetuneConfig(mode="lora", lora_r=4))
    names = _trainable(bb)
    assert names and all("lora_" in n for n in names)
    assert all("language_model" in n for n in names)
    assert not any("vision_tower" in n for n in names)
    assert any("mlp.down_proj" in n for n in names) and any("self_attn.q_proj" in n for n in names)


def test_full_and_frozen_modes():
    full = build_backbone("tiny", finetune={"mode": "full"})
    assert all(p.requires_grad for p in full.parameters())
    frozen = build_backbone("tiny")
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match="finetune mode"):
        FinetuneConfig(mode="adapters")


def _step(bb, builder):
    batch = builder([Item(text="a red circle"), Item(image=make_image(), text="x")], "query")
    e = bb.embed(**batch)
    e.sum().backward()
    return e


def test_lora_with_gradient_checkpointing_trains():
    bb = build_backbone("tiny", finetune=FinetuneConfig(mode="lora", lora_r=4, gradient_checkpointing=True))
    bb.train()
    _step(bb, build_input_builder("tiny"))
    # lora_B starts at zero, so only B receives gradient on the first step.
    grads = [p.grad for n, p in bb.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_qlora_quantizes_llm_only_and_trains():
    bnb = pytest.importorskip("bitsandbytes")
    bb = build_backbone("tiny", finetune=FinetuneConfig(mode="qlora", lora_r=4))
    lin4 = [n for n, m in bb.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert lin4 and all("language_model" in n for n in lin4)
    vision_linear = [m for n, m in bb.named_modules() if "vision_tower" in n and isinstance(m, torch.nn.Linear)]
    assert vision_linear and not any(isinstance(m, bnb.nn.Linear4bit) for m in vision_linear)
    bb.train()
    _step(bb, build_input_builder("tiny"))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in bb.named_parameters() if "lora_B" in n)


def test_same_seed_same_trainable_model():
    a = build_backbone("tiny", seed=5, finetune={"mode": "lora", "lora_r": 4})
    b = build_backbone("tiny", seed=5, finetune={"mode": "lora", "lora_r": 4})
    c = build_backbone("tiny", seed=6, finetune={"mode": "lora", "lora_r": 4})
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if "lora_A" in k)


def test_long_text_is_cut_to_max_text_tokens_and_short_text_untouched():
    b = build_input_builder("tiny", max_text_tokens=8)
    short = "a red circle"
    assert b._cut(short) == short
    long = "two blue stars on the left of a large striped square with a dotted background " * 3
    cut = b._cut(long)
    assert long.startswith(cut.strip()) and len(b.tokenizer(cut, add_special_tokens=False)["input_ids"]) == 8
