"""Embedder.save_pretrained: a plain-transformers load either reproduces the kit's embeddings or fails loudly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import InternVLForConditionalGeneration

from mmembed import Embedder, Item
from mmembed.backbone.tokenizer import ImageOnlyInternVLProcessor
from mmembed.backbone.vtc import apply_vtc
from mmembed.prompts.embedding import template_parts

INSTR = "Find me an everyday image that matches the given query."


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    emb = Embedder.from_pretrained("tiny", vtc_factor=2, device="cpu", seed=3)
    return emb, emb.save_pretrained(tmp_path_factory.mktemp("export") / "model")


def _plain_inputs(folder, image):
    """What a plain-transformers user writes: the folder's processor and chat template, nothing from mmembed."""
    # Stand-in for AutoProcessor, which also builds a video processor (needs torchvision, absent here).
    processor = ImageOnlyInternVLProcessor.from_pretrained(folder)
    content = template_parts("a red circle", INSTR, True, "query")
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                     add_generation_prompt=True) + processor.tokenizer.eos_token
    return processor, processor(text=[prompt], images=[image], return_tensors="pt", crop_to_patches=False,
                                max_patches=1)


def test_export_records_the_compressed_token_count(exported):
    emb, folder = exported
    assert json.loads((folder / "config.json").read_text())["image_seq_length"] == 4  # tiny: 16 native, /4
    proc = json.loads((folder / "processor_config.json").read_text())
    assert proc["image_seq_length"] == 4 and proc["processor_class"] == "InternVLProcessor"
    assert json.loads((folder / "mmembed.json").read_text())["pooled_token"] == "eos"


def test_plain_load_without_compression_fails_loudly(exported, images):
    _, folder = exported
    model = InternVLForConditionalGeneration.from_pretrained(folder).eval()
    processor, inputs = _plain_inputs(folder, images[0])
    assert processor.image_seq_length == 4
    with torch.no_grad(), pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model.model(**inputs)


def test_plain_load_with_two_line_compression_reproduces_the_kit(exported, images):
    emb, folder = exported
    model = InternVLForConditionalGeneration.from_pretrained(folder).eval()
    apply_vtc(model.model, model.config.vtc_factor, model.config.vtc_placement)  # the documented second line
    _, inputs = _plain_inputs(folder, images[0])
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
    plain = F.normalize(hidden[:, -1], dim=-1)
    kit = emb.encode([Item(text="a red circle", image=images[0], instruction=INSTR)], role="query")
    torch.testing.assert_close(plain, kit, atol=1e-5, rtol=0)
    again = Embedder.from_pretrained(folder, device="cpu")
    assert again.input_builder.pooled_token == "eos" and again.module.vtc_factor == 2
    torch.testing.assert_close(again.encode([Item(text="a red circle", image=images[0], instruction=INSTR)]), kit,
                               atol=1e-5, rtol=0)


def test_folders_saved_before_pooled_token_keep_their_pooling(exported, tmp_path):
    _, folder = exported

    old = shutil.copytree(folder, tmp_path / "old")
    settings = json.loads((old / "mmembed.json").read_text())
    del settings["pooled_token"]
    (old / "mmembed.json").write_text(json.dumps(settings))
    assert Embedder.from_pretrained(old, device="cpu").input_builder.pooled_token == "prompt_end"
