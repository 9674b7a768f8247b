"""The public Embedder API on the tiny preset and on stock-transformers checkpoint folders."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from mmembed import Embedder, Item
from mmembed.backbone import FinetuneConfig, build_backbone, build_input_builder
from mmembed.backbone.model import load_processor

from .conftest import make_image

INST = "Find me an everyday image that matches the given query."


def _items(images):
    return [
        Item(text="a red circle", instruction=INST),
        Item(image=images[0], text="what colour is the circle?", instruction="Represent the given image."),
        Item(image=images[1]),
        Item(image=make_image(300, 120, "blue"), kind="document"),
        Item(text="a much longer query about two green squares at the top left of a striped background " * 3),
    ]


def test_encode_shape_norm_order_and_batch_invariance(tiny_embedder, images):
    items = _items(images)
    batched = tiny_embedder.encode(items, role="query", batch_size=5)
    assert batched.shape == (5, tiny_embedder.embed_dim) and batched.dtype == torch.float32
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(5))
    alone = torch.cat([tiny_embedder.encode([it], role="query") for it in items])
    assert (alone - batched).abs().max() < 1e-5  # docs/ARCHITECTURE.md states this bound
    # Different batch sizes reorder by length internally; output order must still follow the input.
    torch.testing.assert_close(tiny_embedder.encode(items, batch_size=2), batched, atol=1e-4, rtol=0)


def test_query_and_candidate_roles_differ(tiny_embedder):
    it = [Item(text="a red circle", instruction=INST)]
    assert not torch.allclose(tiny_embedder.encode(it, role="query"), tiny_embedder.encode(it, role="candidate"))
    with pytest.raises(ValueError, match="role must be"):
        tiny_embedder.encode(it, role="document")


def test_num_visual_tokens_and_backbone(tiny_embedder, images):
    assert tiny_embedder.num_visual_tokens(Item(image=images[0])) == 4
    assert tiny_embedder.num_visual_tokens(Item(text="t")) == 0
    assert isinstance(tiny_embedder.backbone, InternVLForConditionalGeneration)


def test_bad_inputs_give_clear_errors(tiny_embedder, tmp_path):
    with pytest.raises(ValueError, match="item 1 has neither text nor image"):
        tiny_embedder.encode([Item(text="ok"), Item()])
    with pytest.raises(FileNotFoundError, match="image file not found"):
        tiny_embedder.encode([Item(image=tmp_path / "missing.png")])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*bad\.png"):
        tiny_embedder.encode([Item(image=bad)])
    with pytest.raises(TypeError, match="not an mmembed.Item"):
        tiny_embedder.encode(["plain string"])
    with pytest.raises(ValueError, match="unknown preset"):
        Embedder.from_pretrained("tinyy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Embedder.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no .*safetensors"):
        Embedder.from_pretrained(tmp_path / "empty")


def test_mismatched_processor_rejected():
    bb = build_backbone("tiny", vtc_factor=2)
    with pytest.raises(ValueError, match="image_seq_length=16 .* makes 4 tokens"):
        Embedder(bb, build_input_builder("tiny", vtc_factor=1))


def _write_stock_checkpoint(folder, seed=7):
    """A folder in the OpenGVLab/InternVL3-*-hf layout written by stock transformers classes only."""
    proc, config = load_processor("tiny", vtc_factor=1)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.save_pretrained(folder)
    proc.tokenizer.save_pretrained(folder)
    proc.image_processor.save_pretrained(folder)
    return model


def test_local_stock_checkpoint_loads_every_weight(tmp_path, images):
    saved = _write_stock_checkpoint(tmp_path / "ckpt")
    emb = Embedder.from_pretrained(tmp_path / "ckpt", vtc_factor=2, device="cpu")
    loaded = emb.backbone.state_dict()
    ref = saved.state_dict()
    assert loaded.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(loaded[k], v), k
    assert emb.num_visual_tokens(Item(image=images[0])) == 4
    assert emb.encode([Item(image=images[0], text="x")]).shape == (1, 64)


def test_checkpoint_with_missing_weights_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    _write_stock_checkpoint(tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    sd = load_file(f)
    sd.pop(next(k for k in sd if "vision_tower" in k))
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="does not match"):
        Embedder.from_pretrained(tmp_path / "ckpt")


def test_save_pretrained_merges_lora_and_round_trips(tmp_path, images):
    bb = build_backbone("tiny", vtc_factor=2, finetune=FinetuneConfig(mode="lora", lora_r=4), seed=1)
    with torch.no_grad():  # make the adapters matter (lora_B starts at zero)
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    emb = Embedder(bb.eval(), build_input_builder("tiny", vtc_factor=2))
    items = _items(images)
    before = emb.encode(items)
    plain = Embedder(build_backbone("tiny", vtc_factor=2, seed=1).eval(), build_input_builder("tiny", vtc_factor=2))
    assert (plain.encode(items) - before).abs().max() > 1e-3  # LoRA changed the embeddings
    out = emb.save_pretrained(tmp_path / "saved")
    settings = json.loads((out / "mmembed.json").read_text())
    assert settings["vtc_factor"] == 2 and settings["tile_policy"] == {"natural": 1, "document": 4}
    again = Embedder.from_pretrained(out, device="cpu")
    assert again.module.vtc_factor == 2
    assert (again.encode(items) - before).abs().max() < 1e-5
    # Plain transformers loads every weight, with no LoRA keys left.
    stock, info = InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in k for k in stock.state_dict())
    assert stock.config.image_seq_length == 4  # the compressed count: a stock model cannot run it unnoticed
