"""Parameter-free visual token compression (paper §3.2).

InternVL turns the vision encoder's (H, W, C) map into tokens with a pixel shuffle (H/2, W/2, 4C) followed by the
MLP projector. VTC inserts a bilinear downsampling by factor ``s`` between the encoder and the connector, cutting
the visual tokens per tile by ``s**2`` (256 -> 64 for ``s=2`` at 448px) without any new parameter.

Where: ``placement="pre_shuffle"`` (default) resizes the encoder's own feature map F in R^{H x W x C} -- the map the
paper's eq. 3 names -- before pixel shuffle, which in InternVL belongs to the connector (the projector's input
width is 4C). ``"post_shuffle"`` resizes the (H/2, W/2, 4C) map after it. Both give the same token count and
differ numerically. Bilinear with ``align_corners=False`` and no antialias equals 2x2 average pooling at ``s=2``.

How: the stock ``InternVLModel.get_image_features`` calls ``self.pixel_shuffle``; we shadow that method on the
*instance* with a wrapper. Why not a subclass: transformers looks up checkpoint key renaming by class name, so a
renamed subclass silently loads no weights (STACK.md); the instance wrapper keeps the stock class and its loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PLACEMENTS = ("pre_shuffle", "post_shuffle")


def bilinear_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinearly downsample a channels-last map (B, H, W, C) by ``factor`` in each spatial dimension."""
    if factor == 1:
        return x
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"feature map {h}x{w} is not divisible by vtc_factor={factor}; use a factor dividing it")
    y = F.interpolate(x.permute(0, 3, 1, 2), size=(h // factor, w // factor), mode="bilinear", align_corners=False,
                      antialias=False)
    return y.permute(0, 2, 3, 1).contiguous()


class VTCPixelShuffle:
    """Callable that replaces ``InternVLModel.pixel_shuffle`` on an instance: downsample + the stock shuffle.

    A plain object, not an ``nn.Module``: it adds no parameter, buffer or state-dict key.
    """

    def __init__(self, stock_shuffle, factor: int, placement: str) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"vtc_placement must be one of {PLACEMENTS}, got {placement!r}")
        self.stock_shuffle = stock_shuffle
        self.factor = factor
        self.placement = placement

    def __call__(self, vision_features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        if self.placement == "pre_shuffle":
            return self.stock_shuffle(bilinear_downsample(vision_features, self.factor), scale_factor=scale_factor)
        return bilinear_downsample(self.stock_shuffle(vision_features, scale_factor=scale_factor), self.factor)


def tokens_per_tile(config, factor: int) -> int:
    """Visual tokens per tile for an ``InternVLConfig`` at compression ``factor`` (1 = native InternVL3)."""
    size = config.vision_config.image_size
    patch = config.vision_config.patch_size
    size = size[0] if isinstance(size, list | tuple) else size
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    grid = size // patch
    shuffled = int(grid * config.downsample_ratio)
    if factor not in (1, 2, 4) or grid % factor or shuffled % factor:
        raise ValueError(
            f"vtc_factor={factor} does not divide the {grid}x{grid} feature grid of this backbone; use 1, 2 or 4 "
            f"with a grid divisible by 2*factor"
        )
    return (shuffled // factor) ** 2


def apply_vtc(internvl_model, factor: int, placement: str = "pre_shuffle") -> int:
    """Install compression on a stock ``InternVLModel`` (the ``.model`` of ``InternVLForConditionalGeneration``).

    Updates ``config.image_seq_length`` so the image-token count check in the stock forward holds, and records
    the setting in the config (saved with ``save_pretrained``). Returns the tokens per tile.
    """
    n = tokens_per_tile(internvl_model.config, factor)
    stock = type(internvl_model).pixel_shuffle.__get__(internvl_model)
    if factor == 1:
        internvl_model.__dict__.pop("pixel_shuffle", None)
    else:
        # Plain attribute on the instance shadows the class method (nn.Module.__setattr__ stores non-modules as-is).
        object.__setattr__(internvl_model, "pixel_shuffle", VTCPixelShuffle(stock, factor, placement))
    internvl_model.config.image_seq_length = n
    internvl_model.config.vtc_factor = factor
    internvl_model.config.vtc_placement = placement
    return n
