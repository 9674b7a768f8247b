"""InternVL tiling, resizing and normalisation on tensors: the same pixels as the stock PIL processor, faster.

Why hand-written: the stock ``GotOcr2ImageProcessorPil`` (this kit cannot use the torchvision-based fast processor:
torchvision has no CPU build here) spends most of a document image's time outside the arithmetic: keyword-argument
merging and validation, numpy/PIL round trips per tile, float64 rescaling. In the data loader that made image
preprocessing the bottleneck of training the small presets (``benchmarks/bench_dataloader.py``). This module keeps
the stock processor's decisions and reads its settings (tile size, resample filter, mean/std, rescale factor) from
the processor object itself, and only replaces the arithmetic:

- the tile grid comes from the stock ``get_optimal_tiled_canvas`` (same grid, same thumbnail rule);
- resizing is ``torch.nn.functional.interpolate(..., mode="bicubic", antialias=True)`` on the uint8 image, whose
  uint8 kernel follows Pillow's bicubic filter (tests check the pixels against the stock processor);
- rescale and normalise run once on the whole stack of tiles in float32.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_utils import PILImageResampling
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

_MODES = {int(PILImageResampling.BICUBIC): "bicubic", int(PILImageResampling.BILINEAR): "bilinear"}


def _size(size) -> tuple[int, int]:
    if isinstance(size, dict):
        return int(size["height"]), int(size["width"])
    return int(size.height), int(size.width)


def supports(image_processor) -> bool:
    """Whether ``tile_pixels`` reproduces this image processor (bicubic/bilinear resize, the standard steps)."""
    resample = getattr(image_processor, "resample", None)
    return (
        resample is not None and int(resample) in _MODES
        and getattr(image_processor, "do_resize", True) and getattr(image_processor, "do_convert_rgb", True)
        and hasattr(image_processor, "get_number_of_image_patches")
    )


def _resize(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """(1, 3, H, W) uint8 -> (1, 3, height, width) uint8, Pillow-style antialiased filter."""
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode=mode, antialias=True, align_corners=False)


def tile_pixels(image: Image.Image, image_processor, max_tiles: int, min_tiles: int = 1) -> torch.Tensor:
    """Cut an RGB image into InternVL tiles (+ thumbnail) and normalise them, like the stock processor.

    Args:
        image: an RGB PIL image (decode it with ``mmembed.backbone.inputs.load_image``).
        image_processor: the stock ``GotOcr2ImageProcessorPil`` whose settings (``size``, ``resample``,
            ``rescale_factor``, ``image_mean``, ``image_std`` and the ``do_*`` switches) are followed.
        max_tiles: tile cap; 1 resizes the whole image to one tile (``crop_to_patches=False``).
        min_tiles: lower bound of the tile grid.

    Returns:
        (tiles, 3, tile_h, tile_w) float32 pixel values; with more than one grid tile a thumbnail comes last.
    """
    if image.mode != "RGB":
        raise ValueError(f"tile_pixels needs an RGB image, got mode {image.mode!r}; decode it with load_image")
    th, tw = _size(image_processor.size)
    mode = _MODES[int(image_processor.resample)]
    # HWC uint8 -> (1, 3, H, W) in channels-last memory, the layout torch's uint8 resize kernel works in.
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).unsqueeze(0)
    h, w = x.shape[-2:]
    if max_tiles > 1:
        cols, rows = get_optimal_tiled_canvas((h, w), (th, tw), min_tiles, max_tiles)
        grid = _resize(x, rows * th, cols * tw, mode)[0]
        tiles = grid.view(3, rows, th, cols, tw).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, th, tw)
        if rows * cols > 1:
            tiles = torch.cat([tiles, _resize(x, th, tw, mode)], dim=0)
    else:
        tiles = _resize(x, th, tw, mode)
    out = tiles.float()
    if getattr(image_processor, "do_rescale", True):
        out = out * float(image_processor.rescale_factor)
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        out = (out - mean) / std
    return out.contiguous()
