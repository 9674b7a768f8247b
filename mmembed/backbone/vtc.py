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

In-tower compression (beyond the paper, issue 27): VTC leaves the vision tower untouched, and at InternVL3-2B
proportions the tower is about half of a natural tile's compute. ``in_tower_layer=k`` applies the same bilinear
downsampling to the patch-token map *inside* InternViT, on the output of block ``k`` (block 0 = the patch + position
embeddings, blocks 1..L = the encoder layers), so the remaining ``L - k`` layers run on a quarter of the tokens
(factor 2) and the tower already returns the compressed map; VTC's own resize then becomes the identity and the
language model receives the same tokens per tile as with VTC. ``k = L`` gives VTC ``pre_shuffle``'s numbers whenever the
tower's final norm is an identity (InternViT's ``use_mean_pooling=True``, tested); ``k = None`` is VTC exactly.

Position handling: InternViT adds its absolute position embeddings once, at the input (block 0), and its layers
carry no positional term (no RoPE, no relative bias, no attention mask), so after pooling the remaining layers
simply attend over fewer tokens; each pooled token carries the average of its 2x2 sources, position embeddings
included, at its own row-major place in the smaller grid. The CLS token is kept, unpooled, at index 0, because the
stock ``get_image_features`` drops index 0 and reshapes the rest into a square grid.
"""

from __future__ import annotations

import math

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


def pool_patch_tokens(hidden: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinearly downsample the patch tokens of a ViT sequence (B, 1 + H*W, C) by ``factor``; CLS (index 0) kept.

    Patch tokens are in row-major order (as InternViT's patch embedding flattens them and ``get_image_features``
    reshapes them back), so the grid is recovered with a reshape and pooled with :func:`bilinear_downsample`.
    """
    cls, patches = hidden[:, :1], hidden[:, 1:]
    b, n, c = patches.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"in-tower compression needs a square patch grid, got {n} patch tokens")
    pooled = bilinear_downsample(patches.reshape(b, side, side, c), factor).reshape(b, -1, c)
    return torch.cat([cls, pooled], dim=1)


class InTowerPool:
    """Forward hook on one block of the vision tower: replace its output by :func:`pool_patch_tokens` of it.

    A plain object registered with ``register_forward_hook`` on the stock module instance: no parameter, buffer or
    state-dict key, and no change of class (checkpoints load weight for weight).
    """

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, module, args, output: torch.Tensor) -> torch.Tensor:
        return pool_patch_tokens(output, self.factor)


def vision_blocks(internvl_model) -> list:
    """Block 0 (patch + position embeddings) and blocks 1..L (encoder layers) of the InternViT tower."""
    tower = internvl_model.vision_tower
    return [tower.embeddings, *tower.encoder.layer]


def _remove_in_tower(internvl_model) -> None:
    # Stateless removal (no handle kept on the model, which would have to survive deepcopy/pickling): drop every
    # InTowerPool hook found on the tower's blocks.
    for block in vision_blocks(internvl_model):
        for key in [k for k, hook in block._forward_hooks.items() if isinstance(hook, InTowerPool)]:
            del block._forward_hooks[key]


def check_in_tower(config, factor: int, placement: str, in_tower_layer: int) -> None:
    """Validate an in-tower setting against an ``InternVLConfig``; the error says what to change."""
    layers = config.vision_config.num_hidden_layers
    if isinstance(in_tower_layer, bool) or not isinstance(in_tower_layer, int) or not 0 <= in_tower_layer <= layers:
        raise ValueError(f"in_tower_layer={in_tower_layer!r}: use a block index 0..{layers} (0 = after the patch "
                         f"embeddings, {layers} = after the last of this tower's {layers} layers) or off")
    if factor == 1:
        raise ValueError("in_tower_layer needs vtc_factor 2 or 4 (it moves VTC's downsampling into the tower); "
                         "set vtc_factor=2 or in_tower_layer=off")
    if placement != "pre_shuffle":
        raise ValueError(f"in_tower_layer replaces VTC's resize of the encoder map, which is the pre_shuffle "
                         f"placement; got vtc_placement={placement!r}: set vtc_placement=pre_shuffle")
    if config.vision_feature_layer != -1 or config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"in_tower_layer needs the tower's last layer as features, CLS dropped (vision_feature_layer=-1, "
            f"vision_feature_select_strategy='default'); this config has {config.vision_feature_layer!r}, "
            f"{config.vision_feature_select_strategy!r}")


def apply_vtc(internvl_model, factor: int, placement: str = "pre_shuffle", in_tower_layer: int | None = None) -> int:
    """Install compression on a stock ``InternVLModel`` (the ``.model`` of ``InternVLForConditionalGeneration``).

    Updates ``config.image_seq_length`` so the image-token count check in the stock forward holds, and records
    the setting in the config (saved with ``save_pretrained``). Returns the tokens per tile. Calling it again
    replaces the previous setting.

    Args:
        internvl_model: the stock ``InternVLModel``.
        factor: 1 (native), 2 (paper) or 4.
        placement: ``pre_shuffle`` or ``post_shuffle`` (see the module docstring).
        in_tower_layer: ``None`` (VTC between encoder and connector, the paper) or the vision block ``k`` whose
            output is downsampled inside the tower (0 = embeddings, 1..L = encoder layers).
    """
    n = tokens_per_tile(internvl_model.config, factor)
    stock = type(internvl_model).pixel_shuffle.__get__(internvl_model)
    _remove_in_tower(internvl_model)
    if in_tower_layer is not None:
        check_in_tower(internvl_model.config, factor, placement, in_tower_layer)
        vision_blocks(internvl_model)[in_tower_layer].register_forward_hook(InTowerPool(factor))
    if factor == 1 or in_tower_layer is not None:
        # Native, or in-tower: the tower already returns the compressed map, so the connector gets the stock shuffle.
        internvl_model.__dict__.pop("pixel_shuffle", None)
    else:
        # Plain attribute on the instance shadows the class method (nn.Module.__setattr__ stores non-modules as-is).
        object.__setattr__(internvl_model, "pixel_shuffle", VTCPixelShuffle(stock, factor, placement))
    internvl_model.config.image_seq_length = n
    internvl_model.config.vtc_factor = factor
    internvl_model.config.vtc_placement = placement
    internvl_model.config.vtc_in_tower_layer = in_tower_layer
    return n
