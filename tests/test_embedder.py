"""The public Embedder API on the tiny preset and on stock-transformers checkpoint folders."""

from __future__ import annotations

import json

import numpy as np
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
    with pytest.raises(TypeError, match="input 1 is a int"):
        tiny_embedder.encode(["plain string", 3])
    with pytest.raises(TypeError, match=r"unknown keys \['caption'\]"):
        tiny_embedder.encode([{"caption": "x"}])
    with pytest.raises(ValueError, match="precision must be one of"):
        tiny_embedder.encode("x", precision="int8")
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


def test_encode_accepts_sentence_transformers_style_inputs(tiny_embedder, images, tmp_path):
    path = tmp_path / "img.png"
    images[1].save(path)
    items = [Item(text="a red circle"), Item(image=images[0]), Item(image=path), Item(text="t", instruction=INST)]
    ref = tiny_embedder.encode(items, role="candidate")
    mixed = tiny_embedder.encode(["a red circle", images[0], path, {"text": "t", "instruction": INST}],
                                 role="candidate", batch_size=3)
    assert (mixed - ref).abs().max() < 1e-5
    one = tiny_embedder.encode("a red circle", role="candidate", convert_to_numpy=True)
    assert isinstance(one, np.ndarray) and one.shape == (tiny_embedder.embed_dim,)
    assert np.abs(one - ref[0].numpy()).max() < 1e-5
    assert isinstance(tiny_embedder.encode(["x"], convert_to_numpy=True, convert_to_tensor=True), torch.Tensor)
    assert tiny_embedder.encode([]).shape == (0, tiny_embedder.embed_dim)


def test_encode_length_sorting_restores_order_and_matches_unsorted(tiny_embedder, images):
    items = _items(images) + [Item(text="short"), Item(image=images[2], kind="document", text="page")]
    sorted_ = tiny_embedder.encode(items, batch_size=2)
    unsorted = tiny_embedder.encode(items, batch_size=2, sort_by_length=False, show_progress=False)
    assert (sorted_ - unsorted).abs().max() < 1e-4


def test_num_tokens_equals_the_built_sequence_length(tiny_embedder, images):
    b = tiny_embedder.input_builder
    items = _items(images) + [Item(image=make_image(600, 200), kind="document", text="doc page")]
    for role in ("query", "candidate"):
        real = [len(b.encode_one(it, role)["input_ids"]) for it in items]
        assert b.num_tokens(items, role) == real
    assert len(set(real)) > 3  # the lengths really differ, so sorting by them matters


def test_encode_normalize_precision_device_and_similarity(tiny_embedder, images):
    items = ["a red circle", images[0], "two green squares"]
    normed = tiny_embedder.encode(items)
    raw = tiny_embedder.encode(items, normalize_embeddings=False, device="cpu")
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), normed, atol=1e-5, rtol=0)
    bf16 = tiny_embedder.encode(items, precision="bfloat16")
    assert bf16.dtype == torch.float32 and 0 < (bf16 - normed).abs().max() < 0.1  # computed in bf16, close to fp32
    sim = tiny_embedder.similarity(normed, normed[:2].numpy())
    assert sim.shape == (3, 2)
    torch.testing.assert_close(sim, normed @ normed[:2].T, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny_embedder.similarity(raw[0], raw[1]), (normed[0] @ normed[1]).reshape(1, 1),
                               atol=1e-6, rtol=0)
