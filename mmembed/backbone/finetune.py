"""Fine-tuning modes: LoRA (peft) on the language model only, full fine-tuning, QLoRA, frozen."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

FINETUNE_MODES = ("lora", "qlora", "full", "frozen")
# The LLM's attention and MLP projections. The vision tower also has q/k/v_proj, hence the language_model anchor.
DEFAULT_LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Modules QLoRA keeps in full precision (bitsandbytes `llm_int8_skip_modules`). transformers 5 matches these from the
# start of the full module name (or as a suffix), hence the `model.` prefix of InternVLForConditionalGeneration.
QLORA_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


@dataclass
class FinetuneConfig:
    """How the backbone is trained.

    Attributes:
        mode: ``lora`` (default; adapters on the LLM), ``qlora`` (4-bit LLM + LoRA; vision tower and projector in
            full precision), ``full`` (all parameters) or ``frozen`` (no trainable parameter; inference).
        lora_r: LoRA rank (paper: 16).
        lora_alpha: LoRA alpha.
        lora_dropout: dropout on the LoRA path.
        lora_target_modules: regex (peft full-match) or list of module-name suffixes.
        gradient_checkpointing: recompute activations in backward to save memory.
    """

    mode: str = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = DEFAULT_LORA_TARGET
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.mode not in FINETUNE_MODES:
            raise ValueError(f"finetune mode must be one of {FINETUNE_MODES}, got {self.mode!r}")
        if self.mode in ("lora", "qlora") and self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1 for mode={self.mode!r}, got {self.lora_r}")


def apply_finetuning(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Prepare a (possibly 4-bit) ``InternVLForConditionalGeneration`` for training according to ``cfg``.

    Returns the model to train: a ``peft.PeftModel`` for LoRA/QLoRA, the model itself otherwise.
    """
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.mode == "frozen":
        model.requires_grad_(False)
        return model
    if cfg.mode == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, bias="none")
    peft_model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        # Inputs of the first checkpointed block must require grad, or no gradient reaches the adapters.
        peft_model.enable_input_require_grads()
    return peft_model
