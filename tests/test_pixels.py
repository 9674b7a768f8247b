"""The tensor image path (``mmembed.backbone.pixels``) against the stock transformers processor it replaces."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from mmembed import Item
from mmembed.backbone import build_input_builder
from mmembed.backbone.pixels import tile_pixels
from mmembed.data.synth import documents, scenes

# One 8-bit level after normalisation by the smallest std (0.224): what a rounding tie can move a pixel by.
ONE_LEVEL = 1 / 255 / 0.224 + 1e-6


@pytest.fixture(scope="module")
def builders():
    return build_input_builder("tiny", 2), build_input_builder("tiny", 2, fast_images=False)


def _pages(n: int) -> list[Image.Image]:
    rng, taken = random.Random(0), set()
    return [documents.render_page(documents.make_company(rng, taken), documents.PAGE_TYPES[i % 3]) for i in range(n)]


def _scenes() -> list[Image.Image]:
    rng = random.Random(1)
    return [scenes.render(scenes.random_scene(rng), side=s) for s in (96, 256, 37)]


def test_fast_path_matches_the_stock_processor_on_rendered_images(builders):
    fast, stock = builders
    assert fast.fast_images and not stock.fast_images
    items = [Item(image=p, kind="document", instruction="Find the page.") for p in _pages(3)]
    items += [Item(image=im, text="a red circle", kind="natural") for im in _scenes()]
    items += [Item(image=_pages(1)[0].resize((300, 40)), kind="document")]  # a wide strip: a 4 x 1 grid
    for role in ("query", "candidate"):
        a, b = fast(items, role), stock(items, role)
        # Same decisions: tile grids, thumbnails, placeholder expansion and tokens.
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
        assert torch.equal(a["num_tiles"], b["num_tiles"]) and a["num_tiles"].tolist() == [5, 5, 5, 1, 1, 1, 5]
        assert a["pixel_values"].dtype == b["pixel_values"].dtype == torch.float32
        diff = (a["pixel_values"] - b["pixel_values"]).abs()
        assert diff.mean() < 1e-3, f"mean |diff| {diff.mean():.2e}"
        assert diff.max() <= ONE_LEVEL, f"max |diff| {diff.max():.3e} is more than one 8-bit level"


def test_unchanged_size_is_exact_and_grid_order_is_row_major(builders):
    fast, stock = builders
    ip = fast.processor.image_processor
    tile = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    got = tile_pixels(Image.fromarray(tile), ip, max_tiles=1)
    want = stock.processor.image_processor(Image.fromarray(tile), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # no resize: only the normalisation
    # A 2 x 2 canvas of four flat tiles comes back as tiles 0..3 in row-major order, then the thumbnail.
    values = (10, 80, 150, 220)
    quads = [np.full((64, 64, 3), v, dtype=np.uint8) for v in values]
    canvas = np.concatenate([np.concatenate(quads[:2], 1), np.concatenate(quads[2:], 1)], 0)
    out = tile_pixels(Image.fromarray(canvas), ip, max_tiles=4)
    assert out.shape == (5, 3, 64, 64)
    mean0, std0 = ip.image_mean[0], ip.image_std[0]
    for i, v in enumerate(values):
        torch.testing.assert_close(out[i, 0], torch.full((64, 64), (v / 255 - mean0) / std0), atol=1e-5, rtol=0)


def test_non_rgb_input_is_refused_with_the_fix(builders):
    with pytest.raises(ValueError, match="load_image"):
        tile_pixels(Image.new("L", (10, 10)), builders[0].processor.image_processor, max_tiles=1)
