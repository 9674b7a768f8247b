"""In-tower compression (issue 27): VTC's bilinear downsampling applied inside the InternViT tower after block k."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import InternVLForConditionalGeneration

from mmembed import Embedder, Item
from mmembed.backbone import build_backbone
from mmembed.backbone.vtc import InTowerPool, apply_vtc, pool_patch_tokens, vision_blocks

from .conftest import make_image

FEATURES = dict(vision_feature_layer=-1, vision_feature_select_strategy="default")


def _features(backbone, pix: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.internvl.get_image_features(pix, **FEATURES).pooler_output


def _randomise_positions(backbone, seed: int = 1) -> None:
    # The stock init zeroes the position embeddings; random ones make the position tests able to fail.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone.internvl.vision_tower.embeddings.position_embeddings.normal_()


def _block_outputs(backbone, pix: torch.Tensor) -> list[torch.Tensor]:
    """Output of every vision block (0 = embeddings), after any in-tower hook on it."""
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
               for b in vision_blocks(backbone.internvl)]
    try:
        _features(backbone, pix)
    finally:
        for h in handles:
            h.remove()
    return seen


def _hooks(backbone) -> int:
    return sum(isinstance(h, InTowerPool) for b in vision_blocks(backbone.internvl) for h in b._forward_hooks.values())


def test_pool_patch_tokens_keeps_cls_and_averages_2x2():
    x = torch.randn(2, 1 + 16, 3)
    y = pool_patch_tokens(x, 2)
    assert y.shape == (2, 1 + 4, 3)
    assert torch.equal(y[:, 0], x[:, 0])
    grid = x[:, 1:].reshape(2, 4, 4, 3)
    torch.testing.assert_close(y[:, 1], grid[:, :2, :2].mean(dim=(1, 2)))  # top-left 2x2, row-major
    torch.testing.assert_close(y[:, 4], grid[:, 2:, 2:].mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="square patch grid"):
        pool_patch_tokens(torch.randn(1, 1 + 12, 3), 2)


def test_none_is_todays_vtc_bit_for_bit():
    pix = torch.randn(2, 3, 64, 64)
    vtc = build_backbone("tiny", vtc_factor=2, seed=3)
    assert vtc.in_tower_layer is None and _hooks(vtc) == 0 and vtc.config.vtc_in_tower_layer is None
    # Today's VTC, written out on a stock model: tower -> drop CLS -> bilinear /2 -> stock shuffle -> projector.
    stock = InternVLForConditionalGeneration(vtc.config)
    stock.load_state_dict(vtc.hf_model.state_dict())
    with torch.no_grad():
        h = stock.model.vision_tower(pixel_values=pix).last_hidden_state[:, 1:]
        grid = F.avg_pool2d(h.reshape(2, 8, 8, -1).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        ref = stock.model.multi_modal_projector(
            stock.model.pixel_shuffle(grid.contiguous(), 0.5).reshape(2, -1, 4 * h.shape[-1]))
    torch.testing.assert_close(_features(vtc, pix), ref, rtol=0, atol=1e-6)
    # Switching in-tower on and off again leaves no hook behind and gives today's numbers exactly.
    before = _features(vtc, pix)
    apply_vtc(vtc.internvl, 2, "pre_shuffle", 1)
    assert _hooks(vtc) == 1 and not torch.equal(_features(vtc, pix), before)
    apply_vtc(vtc.internvl, 2, "pre_shuffle", None)
    assert _hooks(vtc) == 0 and torch.equal(_features(vtc, pix), before)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_shapes_and_positions(k):
    """Blocks up to k see 64 patches + CLS, later ones 16 + CLS; block k's output is its stock output pooled."""
    pix = torch.randn(2, 3, 64, 64)
    stock = build_backbone("tiny", vtc_factor=2, seed=3)
    tower = build_backbone("tiny", vtc_factor=2, seed=3, in_tower_layer=k)
    for b in (stock, tower):
        _randomise_positions(b)
    assert _hooks(tower) == 1 and "pixel_shuffle" not in tower.internvl.__dict__  # VTC's resize is the identity
    ref, got = _block_outputs(stock, pix), _block_outputs(tower, pix)
    assert [o.shape[1] for o in got] == [65 if i < k else 17 for i in range(k)] + [17] * (3 - k)
    assert all(o.shape[1] == 65 for o in ref)
    # Up to block k the tower is untouched; block k's output is the stock one with its 8x8 patch map pooled to
    # 4x4 and the CLS token kept (position embeddings, added at block 0, are averaged with their patches).
    for i in range(k):
        assert torch.equal(got[i], ref[i])
    torch.testing.assert_close(got[k], pool_patch_tokens(ref[k], 2), rtol=0, atol=0)
    assert torch.equal(got[k][:, 0], ref[k][:, 0])
    feats = _features(tower, pix)
    assert feats.shape == _features(stock, pix).shape == (2, tower.tokens_per_tile, 64)
    if k == 2:  # after the last layer (the final norm is an identity): VTC pre_shuffle's own numbers
        torch.testing.assert_close(feats, _features(stock, pix), rtol=0, atol=0)
    else:
        assert not torch.allclose(feats, _features(stock, pix))


def test_embedding_runs_end_to_end_and_backprops():
    bb = build_backbone("tiny", vtc_factor=2, seed=0, in_tower_layer=1, finetune={"mode": "full"})
    batch = bb.input_builder([Item(image=make_image(), instruction="x"), Item(image=make_image(200, 100),
                                                                               kind="document")], "candidate")
    assert bb.input_builder.num_visual_tokens(Item(image=make_image())) == 4  # same tokens per tile as VTC
    emb = bb.embed(**batch)
    assert emb.shape == (2, bb.embed_dim)
    emb.sum().backward()
    assert bb.internvl.vision_tower.encoder.layer[0].mlp.fc1.weight.grad is not None


def test_bad_settings_fail_with_the_fix():
    with pytest.raises(ValueError, match=r"block index 0\.\.2"):
        build_backbone("tiny", vtc_factor=2, in_tower_layer=3)
    with pytest.raises(ValueError, match="needs vtc_factor 2 or 4"):
        build_backbone("tiny", vtc_factor=1, in_tower_layer=1)
    with pytest.raises(ValueError, match="set vtc_placement=pre_shuffle"):
        build_backbone("tiny", vtc_factor=2, vtc_placement="post_shuffle", in_tower_layer=1)
    with pytest.raises(ValueError, match="block index"):
        build_backbone("tiny", vtc_factor=2, in_tower_layer="middle")


def test_stock_checkpoint_loads_weight_for_weight(tmp_path):
    ref = build_backbone("tiny", vtc_factor=1, seed=5)
    ref.hf_model.save_pretrained(tmp_path)  # a stock InternVL folder (config, safetensors)
    ref.input_builder.processor.save_pretrained(tmp_path)
    ref.input_builder.processor.image_processor.save_pretrained(tmp_path)
    loaded = build_backbone(tmp_path, vtc_factor=2, in_tower_layer=1)
    want, got = ref.hf_model.state_dict(), loaded.hf_model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.in_tower_layer == 1 and loaded.tokens_per_tile == 4


def test_export_round_trip(tmp_path):
    emb = Embedder.from_pretrained("tiny", vtc_factor=2, in_tower_layer=1, device="cpu", seed=3)
    items = [Item(image=make_image(color="blue"), instruction="Represent the given image.")]
    folder = emb.save_pretrained(tmp_path / "model")
    assert json.loads((folder / "mmembed.json").read_text())["vtc_in_tower_layer"] == 1
    assert json.loads((folder / "config.json").read_text())["vtc_in_tower_layer"] == 1
    again = Embedder.from_pretrained(folder, device="cpu")
    assert again.module.in_tower_layer == 1 and _hooks(again.module) == 1
    want = emb.encode(items, role="candidate")
    torch.testing.assert_close(again.encode(items, role="candidate"), want, rtol=0, atol=1e-6)
    # The plain-transformers path: the documented apply_vtc line restores in-tower from the saved config.
    model = InternVLForConditionalGeneration.from_pretrained(folder).eval()
    apply_vtc(model.model, model.config.vtc_factor, model.config.vtc_placement, model.config.vtc_in_tower_layer)
    assert sum(isinstance(h, InTowerPool) for b in vision_blocks(model.model) for h in b._forward_hooks.values()) == 1
    # An explicit "off" overrides the recorded block; it then embeds like plain VTC (different numbers).
    off = Embedder.from_pretrained(folder, device="cpu", in_tower_layer="off")
    assert off.module.in_tower_layer is None and _hooks(off.module) == 0
    assert not torch.allclose(off.encode(items, role="candidate"), want)


def test_command_line_option_reaches_the_embedder(tmp_path):
    from mmembed.cli_args import embedder_from_args
    from mmembed.eval.cli import build_parser

    args = build_parser().parse_args(["mmeb", "--model", "tiny", "--data", str(tmp_path), "--out", str(tmp_path),
                                      "--device", "cpu", "--in-tower-layer", "1"])
    assert embedder_from_args(args).module.in_tower_layer == 1
