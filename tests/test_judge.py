"""The MLLM judge: yes/no token ids, hand-checked logits, prefix reuse, and tiny random checkpoints of each
supported architecture (InternVL-hf, Qwen2-VL, Qwen2.5-VL, Qwen3-VL -- the paper's judge -- and the kit's own saved
folder) loaded from tmp_path."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    InternVLForConditionalGeneration,
    InternVLProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mmembed.backbone.model import load_config
from mmembed.backbone.tokenizer import build_image_processor, build_tokenizer
from mmembed.backbone.vtc import tokens_per_tile
from mmembed.judge import Judge, JudgePair, answer_token_ids, image_only_processor_class, judgment_instruction
from mmembed.types import Item
from tests.conftest import make_image


def _content_template(image_text: str) -> str:
    """A ChatML chat template over content lists (as real image-text-to-text checkpoints ship), images as given."""
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image_text + "{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def save_internvl_hf(path) -> torch.nn.Module:
    """A tiny random InternVL checkpoint in the InternVL3-*-hf layout (native tokens, stock processor)."""
    config = load_config("tiny")
    config.image_seq_length = tokens_per_tile(config, 1)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config)
    model.save_pretrained(path)
    tok = build_tokenizer(2048)
    proc_cls = image_only_processor_class(InternVLProcessor)
    proc_cls(build_image_processor(64), tok, image_seq_length=config.image_seq_length,
             chat_template=_content_template("<IMG_CONTEXT>\n")).save_pretrained(path)
    assert json.loads((path / "processor_config.json").read_text())["image_seq_length"] == config.image_seq_length
    return model


def _qwen_tokenizer():
    tok = build_tokenizer(1024)
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                          "<|video_pad|>"]}, replace_extra_special_tokens=False)
    return tok


def save_qwen_vl(path, version: str) -> torch.nn.Module:
    """A tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint with its processor (no video processor: no
    torchvision)."""
    tok = _qwen_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
                                                         ("video_token_id", "<|video_pad|>"),
                                                         ("vision_start_token_id", "<|vision_start|>"))}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    patch, processor_cls = 14, Qwen2VLProcessor
    torch.manual_seed(0)
    if version == "qwen2_vl":
        config = Qwen2VLConfig(text_config=text, vision_config={**vision, "embed_dim": 32, "mlp_ratio": 2}, **ids)
        model = Qwen2VLForConditionalGeneration(config)
    elif version == "qwen2_5_vl":
        vision = {**vision, "intermediate_size": 64, "out_hidden_size": 32, "window_size": 56,
                  "fullatt_block_indexes": [0]}
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
    else:  # Qwen3-VL: 16 px patches, interleaved M-RoPE, DeepStack visual features fed into early LLM layers
        text = {**text, "head_dim": 8, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": [2, 1, 1], "mrope_interleaved": True}}
        del text["rope_scaling"]
        vision = {**vision, "depth": 2, "patch_size": 16, "intermediate_size": 64, "out_hidden_size": 32,
                  "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
        ids["vision_end_token_id"] = tok.convert_tokens_to_ids("<|vision_end|>")
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **ids))
        patch, processor_cls = 16, Qwen3VLProcessor
    model.save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * patch * patch, max_pixels=16 * patch * patch,
                                               patch_size=patch, merge_size=2, temporal_patch_size=2)
    image_only_processor_class(processor_cls)(
        image_processor, tok, chat_template=_content_template("<|vision_start|><|image_pad|><|vision_end|>")
    ).save_pretrained(path)
    return model


def _pairs(n_targets: int = 3) -> list[JudgePair]:
    query = Item(text="a red circle", image=make_image(color="red"))
    targets = [Item(text="a blue circle", image=make_image(color="blue", seed=1)), Item(image=make_image()),
               Item(text="a green star"), Item(text="two red squares on the left", image=make_image(color="green"))]
    inst = judgment_instruction("NIGHTS")
    return [JudgePair(query, t, inst) for t in targets[:n_targets]]


def _stock_next_token_logits(judge: Judge, pair: JudgePair) -> torch.Tensor:
    """The answer logits straight from the stock model forward on one unpadded prompt."""
    text, _, q, t = judge.render(pair)
    enc = judge.processor(text=[text], images=(q + t) or None, return_tensors="pt")
    with torch.no_grad():
        return judge.model(**enc).logits[0, -1].float()


@pytest.fixture(scope="module")
def kit_judge():
    return Judge.from_pretrained("tiny", device="cpu")


def test_answer_token_ids_variants_and_error(kit_judge):
    tok = kit_judge.tokenizer
    yes = answer_token_ids(tok, "yes")
    assert yes and all(tok.decode([i]).strip().lower() == "yes" for i in yes)
    assert " yes" in [tok.decode([i]) for i in yes]  # the kit vocabulary only has the leading-space spelling
    with pytest.raises(ValueError, match="no single token for 'xylophonist'"):
        answer_token_ids(tok, "xylophonist")


def test_hand_checked_logits(kit_judge):
    """An output layer with zero weights and a chosen bias makes every logit known in advance."""
    judge = Judge.from_pretrained("tiny", device="cpu")
    hidden = judge.model.config.text_config.hidden_size
    head = torch.nn.Linear(hidden, len(judge.tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-5.0)
        head.bias[judge.yes_ids[0]] = 2.5
        head.bias[judge.no_ids[0]] = -1.0
    judge.model.set_output_embeddings(head)
    scores = judge.score(_pairs(2))
    assert scores.yes.tolist() == [2.5, 2.5] and scores.no.tolist() == [-1.0, -1.0]
    assert scores.score.tolist() == [3.5, 3.5] and scores.relevant.tolist() == [True, True]
    with torch.no_grad():  # a second spelling with a larger logit wins: the word's logit is its best spelling
        head.bias[judge.no_ids[0]] = 4.0
    assert judge.score(_pairs(1)).relevant.tolist() == [False]


def test_batched_and_prefix_reuse_match_stock_forward(kit_judge):
    pairs = _pairs(4)
    plain = kit_judge.score(pairs, batch_size=3)
    reused = kit_judge.score(pairs, batch_size=2, reuse_prefix=True)
    ref = torch.stack([_stock_next_token_logits(kit_judge, p) for p in pairs])
    ref_yes, ref_no = ref[:, kit_judge.yes_ids].amax(-1), ref[:, kit_judge.no_ids].amax(-1)
    torch.testing.assert_close(plain.yes, ref_yes, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain.no, ref_no, atol=1e-5, rtol=0)
    torch.testing.assert_close(reused.yes, ref_yes, atol=1e-5, rtol=0)
    torch.testing.assert_close(reused.no, ref_no, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["internvl_hf", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_stock_checkpoints_load_and_score(tmp_path, arch):
    saved = save_internvl_hf(tmp_path) if arch == "internvl_hf" else save_qwen_vl(tmp_path, arch)
    judge = Judge.from_pretrained(tmp_path, device="cpu")
    assert judge.model_type == {"internvl_hf": "internvl"}.get(arch, arch)
    pairs = _pairs(4)
    text = judge.render(pairs[0])[0]
    assert text.count("Query: ") == 1 and "Target: " in text and text.endswith("<|im_start|>assistant\n")
    scores = judge.score(pairs, batch_size=3, reuse_prefix=True)  # Qwen-VL: reuse falls back to plain batches
    ref = torch.stack([_stock_next_token_logits(judge, p) for p in pairs])
    torch.testing.assert_close(scores.yes, ref[:, judge.yes_ids].amax(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(scores.no, ref[:, judge.no_ids].amax(-1), atol=1e-4, rtol=0)
    # the loaded weights are the saved ones (a key the loader silently re-initialised would change the logits)
    text, _, q, t = judge.render(pairs[0])
    with torch.no_grad():
        original = saved.eval()(**judge.processor(text=[text], images=q + t, return_tensors="pt")).logits[0, -1]
    torch.testing.assert_close(ref[0], original.float(), atol=1e-5, rtol=0)


def test_kit_saved_folder_restores_compression(tmp_path, kit_judge):
    from mmembed import Embedder

    Embedder.from_pretrained("tiny", vtc_factor=2, device="cpu").save_pretrained(tmp_path)
    judge = Judge.from_pretrained(tmp_path, device="cpu")
    assert judge.processor.image_seq_length == kit_judge.processor.image_seq_length
    pairs = _pairs(2)
    torch.testing.assert_close(judge.score(pairs).score, kit_judge.score(pairs).score, atol=1e-5, rtol=0)


def test_each_image_is_preprocessed_once_per_score_call(kit_judge, monkeypatch):
    """The query's image (shared by its K candidates) and a candidate image recurring across queries are decoded and
    preprocessed once per ``score`` call; scores stay equal to the stock forward (the test above)."""
    import mmembed.judge.judge as judge_mod

    seen: list[int] = []
    inner = kit_judge.processor.image_processor
    real_call = type(inner).__call__

    def counting(self, images, **kwargs):
        seen.append(len(images) if isinstance(images, list) else 1)
        return real_call(self, images, **kwargs)

    monkeypatch.setattr(type(inner), "__call__", counting)
    shared = Item(image=make_image(color="blue", seed=3))
    queries = [Item(text="q1", image=make_image(color="red")), Item(text="q2", image=make_image(color="green"))]
    pairs = [JudgePair(q, t, "inst") for q in queries for t in (shared, Item(text="a star"), Item(image=make_image()))]
    scores = kit_judge.score(pairs, batch_size=2, reuse_prefix=True)
    assert sum(seen) == 5  # 2 query images + the shared target + one fresh target object per query (not 2 x 3 + 2)
    assert kit_judge.processor.image_processor is inner  # restored after the call
    plain = [_stock_next_token_logits(kit_judge, p)[kit_judge.yes_ids].amax() for p in pairs]
    torch.testing.assert_close(scores.yes, torch.stack(plain), atol=1e-5, rtol=0)

    memo = judge_mod._ImageMemo(inner, max_bytes=1)  # a bound below one entry keeps only the newest image
    a, b = make_image(seed=5), make_image(seed=6)
    for image in (a, b, a):
        memo([image], return_tensors="pt")
    assert (memo.misses, memo.hits, len(memo.entries)) == (3, 0, 1)
