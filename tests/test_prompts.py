"""Prompt parity with released InternVL3-*-hf checkpoints, and which token the embedding is read at."""

from __future__ import annotations

import copy

import pytest
import torch

from mmembed import Item
from mmembed.backbone.model import build_backbone, build_input_builder, load_processor

# Reference copy of the chat template the released OpenGVLab/InternVL3-*-hf folders carry, as transformers'
# src/transformers/models/internvl/convert_internvl_weights_to_hf.py writes it (current version: an image part
# renders as "<IMG_CONTEXT>\n", which the stock InternVLProcessor expands). Kept here, apart from the code, so
# the test compares the kit against the published text rather than against itself.
PUBLISHED_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)
INSTR = "Find me an everyday image that matches the given query."
CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "text", "text": "Instruct: x "}, {"type": "image"},
                                  {"type": "text", "text": "Query: a red circle"}]}],
    [{"role": "user", "content": "plain string content"}, {"role": "assistant", "content": "a reply"}],
]


@pytest.mark.parametrize("preset", ["tiny", "internvl3_2b"])
def test_preset_chat_template_renders_like_the_published_one(preset):
    tok = load_processor(preset)[0].tokenizer
    for conv in CONVERSATIONS:
        for gen in (True, False):
            ours = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            published = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen,
                                                chat_template=PUBLISHED_TEMPLATE)
            assert ours == published
            assert "system" not in ours


def test_item_prompt_is_the_published_rendering_plus_eos(images):
    b = build_input_builder("tiny")
    got = b.prompt(Item(text="a red circle", image=images[0], instruction=INSTR), "query")
    assert got == (f"<|im_start|>user\nInstruct: {INSTR} <IMG_CONTEXT>\nQuery: a red circle<|im_end|>\n"
                   "<|im_start|>assistant\n<|im_end|>")
    cand = b.prompt(Item(text="a cat", instruction="Represent the given text."), "candidate")
    assert cand == ("<|im_start|>user\nInstruct: Represent the given text. Text: a cat<|im_end|>\n"
                    "<|im_start|>assistant\n<|im_end|>")


def test_real_size_preset_prompt_ids_match_released_ids(images):
    b = build_input_builder("internvl3_1b")
    ids = b([Item(text="a red circle", image=images[0], instruction=INSTR)], "query")["input_ids"][0].tolist()
    assert ids[0] == 151644  # <|im_start|>
    assert ids.count(151667) == 64 and ids.count(151665) == 1 and ids.count(151666) == 1  # 64 <IMG_CONTEXT>/tile
    assert ids[-1] == 151645  # <|im_end|>: the pooled EOS


def test_pooled_position_holds_eos_under_right_padding(images):
    b = build_input_builder("tiny")
    items = [Item(text="a much longer query about a red circle on the left", instruction=INSTR),
             Item(image=images[1], instruction="Represent the given image."), Item(text="x")]
    batch = b(items, "query")
    last = batch["attention_mask"].sum(-1) - 1  # right padding: the pooled (last real) position
    pooled = batch["input_ids"][torch.arange(len(items)), last]
    assert b.pooled_token_id == b.tokenizer.eos_token_id == b.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert pooled.tolist() == [b.pooled_token_id] * len(items)
    assert (batch["attention_mask"].sum(-1) < batch["input_ids"].shape[1]).any()  # some row really is padded


def test_prompt_end_setting_pools_the_generation_prompt_newline(images):
    eos = build_input_builder("tiny")
    old = build_input_builder("tiny", pooled_token="prompt_end")
    item = Item(text="a red circle", instruction=INSTR)
    ids = old([item], "query")["input_ids"][0].tolist()
    assert old.pooled_token_id is None
    assert old.tokenizer.decode(ids).endswith("<|im_start|>assistant\n") and old.tokenizer.decode(ids[-1:]) == "\n"
    assert eos([item], "query")["input_ids"][0].tolist() == ids + [eos.tokenizer.eos_token_id]
    bb = build_backbone("tiny", seed=0).eval()
    with torch.no_grad():
        a, b = bb.embed(**eos([item], "query")), bb.embed(**old([item], "query"))
    assert (a - b).abs().max() > 1e-4  # the setting changes which hidden state is the embedding
    with pytest.raises(ValueError, match="pooled_token must be one of"):
        build_input_builder("tiny", pooled_token="first")


def test_real_folder_and_preset_give_the_same_prompt(tmp_path, images):
    """A folder in the InternVL3-*-hf layout carrying the published template prompts exactly like the preset."""
    from transformers import InternVLForConditionalGeneration

    proc, config = load_processor("tiny", vtc_factor=1)
    InternVLForConditionalGeneration(config).save_pretrained(tmp_path / "hf")
    proc.tokenizer.chat_template = PUBLISHED_TEMPLATE
    proc.tokenizer.save_pretrained(tmp_path / "hf")
    proc.image_processor.save_pretrained(tmp_path / "hf")
    proc.tokenizer.chat_template = load_processor("tiny")[0].tokenizer.chat_template  # restore the shared cache
    real, preset = build_input_builder(tmp_path / "hf"), build_input_builder("tiny")
    for item, role in [(Item(text="a red circle", image=images[0], instruction=INSTR), "query"),
                       (Item(image=images[1], kind="document"), "candidate"), (Item(text="a cat"), "candidate")]:
        assert real.prompt(item, role) == preset.prompt(item, role)
        assert real([item], role)["input_ids"].tolist() == preset([item], role)["input_ids"].tolist()


def test_a_template_without_the_image_placeholder_is_a_clear_error(images):
    """An older -hf template rendering image parts as '<image>' would leave the processor nothing to expand."""
    b = build_input_builder("tiny")
    b.tokenizer = copy.deepcopy(b.tokenizer)  # the preset tokenizer is shared (cached): change a copy
    b.tokenizer.chat_template = PUBLISHED_TEMPLATE.replace("<IMG_CONTEXT>\n", "<image>\n")
    assert "<image>" in b.tokenizer.chat_template
    with pytest.raises(ValueError, match="does not render an image part as '<IMG_CONTEXT>'"):
        b.prompt(Item(text="x", image=images[0]), "query")
    assert b.prompt(Item(text="x"), "query").endswith("<|im_end|>")  # text-only items are unaffected
