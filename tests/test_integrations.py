"""sentence-transformers and stock-transformers loads of an exported folder; Embedder's prompt parameters."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch

from mmembed import Embedder, Item
from tests.conftest import make_image

INSTR = "Find me an everyday image that matches the given query."


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    emb = Embedder.from_pretrained("tiny", vtc_factor=2, device="cpu", seed=3)
    return emb, emb.save_pretrained(tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="module")
def st_model(exported):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(exported[1]), trust_remote_code=True, device="cpu")


def _inputs(tmp_path):
    """The same five inputs as sentence-transformers takes them and as Embedder.encode takes them."""
    red, blue = make_image(color="red"), make_image(64, 48, color="blue", seed=2)
    red.save(tmp_path / "red.png")
    buf = io.BytesIO()
    blue.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    st_in = ["a red circle", red, {"text": "a blue shape on white", "image": blue}, str(tmp_path / "red.png"), uri]
    kit_in = ["a red circle", red, {"text": "a blue shape on white", "image": blue}, Item(image=red),
              Item(image=buf.getvalue())]
    return st_in, kit_in


def test_sentence_transformers_encodes_like_the_embedder(exported, st_model, tmp_path):
    emb, _ = exported
    st_in, kit_in = _inputs(tmp_path)
    plain = st_model.encode(st_in, convert_to_tensor=True)
    torch.testing.assert_close(plain, emb.encode(kit_in), atol=1e-5, rtol=0)
    assert st_model.get_embedding_dimension() == emb.embed_dim
    # query template + a named prompt (the paper's instruction), and the candidate template + an explicit prompt
    q = st_model.encode_query(st_in, prompt_name="MSCOCO_t2i-query", convert_to_tensor=True)
    torch.testing.assert_close(q, emb.encode_query(kit_in, prompt_name="MSCOCO_t2i-query"), atol=1e-5, rtol=0)
    d = st_model.encode_document(st_in, prompt="Represent the given image.", convert_to_tensor=True)
    torch.testing.assert_close(d, emb.encode_document(kit_in, prompt="Represent the given image."), atol=1e-5, rtol=0)
    # the prompt and the role reach the model: each changes every vector
    for other in (q, d):
        assert ((other - plain).norm(dim=-1) > 1e-3).all()
    # vectors come back normalised (the model's native output) whatever sentence-transformers' default says
    torch.testing.assert_close(plain.norm(dim=-1), torch.ones(len(st_in)), atol=1e-5, rtol=0)


def test_sentence_transformers_prompts_are_the_paper_tables(exported, st_model):
    emb, folder = exported
    saved = json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"]
    assert saved == emb.prompts and saved["MSCOCO_t2i-query"] == INSTR
    assert st_model.prompts["Colpali-document"] == "Represent the given visual documents."


def test_sentence_transformers_save_round_trips(st_model, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    st_model.prompts["mine-query"] = INSTR  # a user's own prompt survives SentenceTransformer.save
    try:
        st_model.save(str(tmp_path / "again"))
    finally:
        del st_model.prompts["mine-query"]
    again = st.SentenceTransformer(str(tmp_path / "again"), trust_remote_code=True, device="cpu")
    assert again.prompts["mine-query"] == INSTR
    texts = ["a red circle", "a blue square"]
    want = st_model.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(again.encode(texts, convert_to_tensor=True), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # sentence-transformers' own rule, its message
        st.SentenceTransformer(str(tmp_path / "again"), device="cpu")


def test_sentence_transformers_refuses_what_it_cannot_embed(st_model):
    with pytest.raises(ValueError, match="not fetched"):
        st_model.encode(["https://example.com/cat.png"])
    with pytest.raises(ValueError, match="chat messages are not supported"):
        st_model.encode([[{"role": "user", "content": "hi"}]])


def test_embedder_prompt_fills_missing_instructions_only(tiny_embedder):
    own = Item(text="a red circle", instruction="Represent the given text.")
    with_prompt = tiny_embedder.encode([own, "a red circle"], prompt=INSTR)
    explicit = tiny_embedder.encode([own, Item(text="a red circle", instruction=INSTR)])
    torch.testing.assert_close(with_prompt, explicit, atol=1e-5, rtol=0)
    named = tiny_embedder.encode("a red circle", prompt_name="MSCOCO_t2i-query")
    torch.testing.assert_close(named, explicit[1], atol=1e-5, rtol=0)
    doc = tiny_embedder.encode_document("a red circle")
    torch.testing.assert_close(doc, tiny_embedder.encode("a red circle", role="candidate"), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown prompt_name 'nope'"):
        tiny_embedder.encode("x", prompt_name="nope")


def test_exported_folder_loads_with_auto_processor(exported):
    from transformers import AutoProcessor

    emb, folder = exported
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert processor.image_seq_length == emb.input_builder.processor.image_seq_length == 4
    item = Item(text="a red circle", image=make_image(), instruction=INSTR)
    prompt = emb.input_builder.prompt(item, "query")
    kwargs = dict(text=[prompt], images=[make_image()], return_tensors="pt", crop_to_patches=False, max_patches=1)
    got, want = processor(**kwargs), emb.input_builder.processor(**kwargs)
    assert torch.equal(got["input_ids"], want["input_ids"])
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"])
    # the file transformers imports is self-contained: no mmembed import inside
    assert "mmembed" not in (folder / "processing_mmembed.py").read_text().split('"""', 2)[2]
