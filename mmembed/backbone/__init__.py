"""The VTC InternVL3 backbone: presets, loading, compression, tiling, templates, pooling, fine-tuning modes."""

from mmembed.backbone.finetune import FinetuneConfig, apply_finetuning
from mmembed.backbone.inputs import InputBuilder, TilePolicy, load_image
from mmembed.backbone.model import VTCBackbone, build_backbone, build_input_builder, load_processor
from mmembed.backbone.pooling import last_token_pool
from mmembed.backbone.presets import PRESETS
from mmembed.backbone.templates import instructions_for
from mmembed.backbone.vtc import apply_vtc, bilinear_downsample, tokens_per_tile

__all__ = [
    "PRESETS", "FinetuneConfig", "InputBuilder", "TilePolicy", "VTCBackbone", "apply_finetuning", "apply_vtc",
    "bilinear_downsample", "build_backbone", "build_input_builder", "instructions_for", "last_token_pool",
    "load_image", "load_processor", "tokens_per_tile",
]
