"""The FSDP strategy config for the 8B preset composes and builds a layer-wrapped strategy.

No multi-process run here: Lightning 2.6 refuses ``FSDPStrategy`` without a CUDA accelerator ("The strategy `fsdp`
requires a GPU accelerator"), so a 2-process CPU (gloo) run cannot be made with the stock strategy.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="run", overrides=overrides)


def test_fsdp_config_builds_a_layer_wrapped_strategy_for_8b():
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.internvl.modeling_internvl import InternVLVisionLayer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    cfg = _compose(["trainer=fsdp", "backbone=internvl3_8b"])
    assert cfg.backbone.name_or_path == "internvl3_8b" and cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert set(policy._module_classes) == {Qwen2DecoderLayer, InternVLVisionLayer}
