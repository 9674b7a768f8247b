"""The shared backbone: stock transformers InternVL3 + VTC, built from a preset or a local HF checkpoint."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

from mmembed.backbone.finetune import QLORA_SKIP_MODULES, FinetuneConfig, apply_finetuning
from mmembed.backbone.inputs import InputBuilder, TilePolicy
from mmembed.backbone.pooling import last_token_pool
from mmembed.backbone.presets import PRESETS, preset_config
from mmembed.backbone.tokenizer import ImageOnlyInternVLProcessor, build_image_processor, build_tokenizer
from mmembed.backbone.vtc import PLACEMENTS, apply_vtc, check_in_tower, tokens_per_tile

DEFAULT_VTC_FACTOR = 2
DEFAULT_PLACEMENT = "pre_shuffle"
MMEMBED_CONFIG = "mmembed.json"
#: The weight files a checkpoint folder must hold (single file, or the index of a sharded checkpoint).
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _is_folder(name_or_path: str | Path) -> bool:
    return str(name_or_path) not in PRESETS and (Path(name_or_path).exists() or "/" in str(name_or_path))


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder (and not a preset: {sorted(PRESETS)})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no config.json); point at an InternVL3-*-hf folder")
    # By name, as transformers looks them up: any other *.safetensors file would not be what gets loaded, and
    # from_pretrained would then fall back to a pickle (pytorch_model.bin) that can run code when unpickled.
    if not any((path / name).is_file() for name in SAFETENSORS_WEIGHTS):
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))[:4]
        raise FileNotFoundError(f"{path}: no {' or '.join(SAFETENSORS_WEIGHTS)} in this folder (found "
                                f"{found or 'none'}); this kit loads safetensors weights only (save_pretrained)")


def saved_settings(name_or_path) -> dict:
    """What an mmembed-saved folder recorded in ``mmembed.json`` (VTC, tiling, prompt settings); ``{}`` otherwise."""
    if not _is_folder(name_or_path):
        return {}
    f = Path(name_or_path) / MMEMBED_CONFIG
    return json.loads(f.read_text()) if f.is_file() else {}


def resolve_vtc(name_or_path, vtc_factor: int | None, vtc_placement: str | None,
                saved: dict | None = None) -> tuple[int, str]:
    """Explicit arguments win; else what an mmembed-saved folder recorded (``saved``, read here when not given);
    else the paper's (2, pre_shuffle)."""
    saved = saved_settings(name_or_path) if saved is None else saved
    factor = vtc_factor if vtc_factor is not None else saved.get("vtc_factor", DEFAULT_VTC_FACTOR)
    placement = vtc_placement or saved.get("vtc_placement", DEFAULT_PLACEMENT)
    if placement not in PLACEMENTS:
        raise ValueError(f"vtc_placement must be one of {PLACEMENTS}, got {placement!r}")
    return int(factor), placement


def resolve_in_tower(in_tower_layer: int | str | None, saved: dict) -> int | None:
    """The in-tower block: explicit ``k`` wins, ``"off"`` / ``"none"`` turns it off, ``None`` takes what an
    mmembed-saved folder recorded (``vtc_in_tower_layer``), else off (the paper's VTC)."""
    if in_tower_layer is None:
        return saved.get("vtc_in_tower_layer")
    if isinstance(in_tower_layer, str):
        if in_tower_layer.strip().lower() in ("off", "none", "null", ""):
            return None
        if not in_tower_layer.strip().isdigit():
            raise ValueError(f"in_tower_layer={in_tower_layer!r}: give a vision block index (0..L) or 'off'")
        return int(in_tower_layer)
    return int(in_tower_layer)


def load_config(name_or_path: str | Path) -> InternVLConfig:
    """The stock ``InternVLConfig`` of a preset or a checkpoint folder (no weights, tokenizer or image processor)."""
    if _is_folder(name_or_path):
        path = Path(name_or_path)
        _check_folder(path)
        return InternVLConfig.from_pretrained(path)
    if str(name_or_path) not in PRESETS:
        raise ValueError(f"unknown preset {name_or_path!r}; choose one of {sorted(PRESETS)} or a local folder")
    tokenizer = _preset_tokenizer(str(name_or_path))
    return preset_config(str(name_or_path), len(tokenizer), tokenizer.context_image_token_id)


def load_processor(name_or_path: str | Path, vtc_factor: int | None = None, image_seq_length: int | None = None):
    """Build (preset) or load (folder) the image-only InternVL processor, with ``image_seq_length`` set for VTC.

    Cheap: builds no model, so DataModules can call it in every worker. Returns ``(processor, config)``.

    Raises:
        ValueError: ``image_seq_length`` was given and disagrees with what ``vtc_factor`` implies.
    """
    factor = vtc_factor if vtc_factor is not None else resolve_vtc(name_or_path, None, None)[0]
    config = load_config(name_or_path)
    if _is_folder(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        image_processor = GotOcr2ImageProcessorPil.from_pretrained(name_or_path)
    else:
        tokenizer = _preset_tokenizer(str(name_or_path))
        size = config.vision_config.image_size
        image_processor = build_image_processor(size[0] if isinstance(size, list | tuple) else size)
    n = tokens_per_tile(config, factor)
    if image_seq_length is not None and image_seq_length != n:
        raise ValueError(
            f"image_seq_length={image_seq_length} but vtc_factor={factor} gives {n} visual tokens per tile for this "
            f"backbone; drop image_seq_length (it is derived) or set vtc_factor to match"
        )
    processor = ImageOnlyInternVLProcessor(image_processor, tokenizer, image_seq_length=n)
    return processor, config


_TOKENIZERS: dict[tuple[int, int | None], object] = {}


def _preset_tokenizer(preset: str):
    # Building the BPE takes up to a few seconds; presets with the same vocabulary share the (deterministic) result.
    key = (PRESETS[preset].tokenizer_vocab, PRESETS[preset].special_ids_from)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = build_tokenizer(*key)
    return _TOKENIZERS[key]


def _load_model(name_or_path, config: InternVLConfig, quantize_4bit: bool, dtype: torch.dtype | None, seed: int):
    if not _is_folder(name_or_path):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = InternVLForConditionalGeneration(config)
        if dtype is not None:
            model = model.to(dtype)
        if not quantize_4bit:
            return model
        # QLoRA on a random-init preset goes through the same path as a real checkpoint: save, reload quantized.
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return _load_model(tmp, config, True, dtype, seed)
    kwargs = {}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype or torch.float32,
            llm_int8_skip_modules=QLORA_SKIP_MODULES)
    model, info = InternVLForConditionalGeneration.from_pretrained(
        name_or_path, config=config, dtype=dtype or "auto", output_loading_info=True, use_safetensors=True, **kwargs)
    bad = {k: sorted(v)[:5] for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise RuntimeError(f"{name_or_path}: checkpoint does not match the InternVL architecture: {bad} "
                           f"{info.get('error_msgs', '')}; is this an InternVL3-*-hf folder?")
    return model


class VTCBackbone(nn.Module):
    """A stock ``InternVLForConditionalGeneration`` with visual token compression, plus last-token embedding.

    It also carries the one ``InputBuilder`` (processor + templates + tiling) that matches its compression: every
    consumer — DataModules, the LightningModules' ``Embedder`` view, mining, export — takes it from here, so the
    compression factor reaches the processor one way only (``build_backbone`` builds both from the same settings).

    Args:
        model: the transformers model (plain, peft-wrapped, or 4-bit).
        vtc_factor: compression factor ``s`` (1 = native InternVL3, 2 = paper, 4).
        vtc_placement: ``pre_shuffle`` (default) or ``post_shuffle``; see ``mmembed.backbone.vtc``.
        input_builder: the matching input builder; checked against the compression here.
        in_tower_layer: ``None`` (the paper's VTC) or the vision block after which the tower itself downsamples
            (in-tower compression, see ``mmembed.backbone.vtc``).
    """

    def __init__(self, model: nn.Module, vtc_factor: int = DEFAULT_VTC_FACTOR,
                 vtc_placement: str = DEFAULT_PLACEMENT, input_builder: InputBuilder | None = None,
                 in_tower_layer: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.vtc_factor = vtc_factor
        self.vtc_placement = vtc_placement
        self.in_tower_layer = in_tower_layer
        self.tokens_per_tile = apply_vtc(self.internvl, vtc_factor, vtc_placement, in_tower_layer)
        if input_builder is not None:
            self.check_processor(input_builder.processor)
        self._input_builder = input_builder

    @property
    def input_builder(self) -> InputBuilder:
        """The ``InputBuilder`` built with this backbone (same processor, compression and tile policy)."""
        if self._input_builder is None:
            raise ValueError("this VTCBackbone was built without an input builder; build it with build_backbone() or "
                             "pass input_builder=build_input_builder(<preset or folder>, vtc_factor=...)")
        return self._input_builder

    @property
    def hf_model(self) -> InternVLForConditionalGeneration:
        """The underlying transformers model (LoRA layers, if any, are injected in place)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def internvl(self):
        """The stock ``InternVLModel`` (vision tower, projector, language model; no LM head)."""
        return self.hf_model.model

    @property
    def config(self) -> InternVLConfig:
        return self.hf_model.config

    @property
    def embed_dim(self) -> int:
        return self.config.text_config.hidden_size

    def check_processor(self, processor) -> None:
        """Fail early, with the fix, when a processor's token count disagrees with this backbone's compression."""
        if processor.image_seq_length != self.tokens_per_tile:
            raise ValueError(
                f"processor.image_seq_length={processor.image_seq_length} but the backbone (vtc_factor="
                f"{self.vtc_factor}) makes {self.tokens_per_tile} tokens per tile; build the processor with "
                f"load_processor(..., vtc_factor={self.vtc_factor})"
            )

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
              normalize: bool = True, **_: object) -> torch.Tensor:
        """(B, D) last-token embeddings (paper eq. 1), L2-normalised unless ``normalize=False``.

        Extra batch keys (``num_tiles``) are ignored.
        """
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.internvl.vision_tower.dtype)
        out = self.internvl(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            use_cache=False)
        return last_token_pool(out.last_hidden_state, attention_mask, normalize=normalize)

    def answer_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        """(B, V) next-token logits at each row's last real token: the distribution of a generated answer.

        The same numbers as :meth:`forward`'s logits at that position (the stock ``lm_head`` on the stock final
        hidden state), but the LM head runs on B positions instead of B x L: with a ~151k vocabulary the full
        (B, L, V) logits of a reranking batch would not fit. Used by the reranker (paper §3.4).
        """
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.internvl.vision_tower.dtype)
        out = self.internvl(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            use_cache=False)
        last = last_token_pool(out.last_hidden_state, attention_mask, normalize=False)
        return self.hf_model.lm_head(last)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs):
        """Language-model forward (logits, and the stock shifted next-token loss when ``labels`` are given)."""
        kwargs.pop("num_tiles", None)
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.internvl.vision_tower.dtype)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                          labels=labels, use_cache=False, **kwargs)


def build_backbone(
    name_or_path: str | Path = "tiny",
    vtc_factor: int | None = None,
    vtc_placement: str | None = None,
    finetune: FinetuneConfig | dict | None = None,
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    tile_policy: TilePolicy | dict | None = None,
    use_chat_template: bool | None = None,
    max_text_tokens: int | None = None,
    pooled_token: str | None = None,
    in_tower_layer: int | str | None = None,
) -> VTCBackbone:
    """Build the shared backbone — model and its ``InputBuilder`` — from a preset (random init, seeded) or a folder.

    Every setting left ``None`` takes what an mmembed-saved folder recorded in ``mmembed.json`` (read once here),
    else the paper's default.

    Args:
        name_or_path: preset (``tiny``, ``mini``, ``internvl3_1b``, ``internvl3_2b``, ``internvl3_8b``) or a folder
            in the ``OpenGVLab/InternVL3-*-hf`` layout (or one written by ``Embedder.save_pretrained``).
        vtc_factor: 1, 2 or 4; default: what the folder recorded, else 2.
        vtc_placement: ``pre_shuffle`` / ``post_shuffle``; default as above.
        finetune: a ``FinetuneConfig`` (or its fields); ``None`` = frozen.
        dtype: parameter dtype (e.g. ``torch.bfloat16`` or ``"bfloat16"``); default fp32 for presets, the
            checkpoint's own for folders.
        seed: init seed for presets.
        tile_policy: tile caps per item kind (default natural 1 / document 4, paper §5.2).
        use_chat_template: wrap prompts in the tokenizer's chat template (default True).
        max_text_tokens: cap on an item's free text (default 256).
        pooled_token: ``"eos"`` (default: ``<|im_end|>`` appended and pooled, the paper's single [EOS] token) or
            ``"prompt_end"`` (the last prompt token; folders saved before the setting existed used it).
        in_tower_layer: in-tower compression after vision block ``k`` (0 = embeddings, 1..L = layers; needs
            ``vtc_factor`` >= 2); ``"off"`` for none; default: what the folder recorded, else off (the paper's VTC).
    """
    saved = saved_settings(name_or_path)
    factor, placement = resolve_vtc(name_or_path, vtc_factor, vtc_placement, saved)
    in_tower = resolve_in_tower(in_tower_layer, saved)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    ft = finetune if isinstance(finetune, FinetuneConfig) else FinetuneConfig(**(finetune or {"mode": "frozen"}))
    # One read of the config for the processor and the model; a factor that does not divide the grid fails here,
    # before any weight loads.
    processor, config = load_processor(name_or_path, factor)
    if in_tower is not None:  # a bad block index or a factor of 1 fails here too, before any weight loads
        check_in_tower(config, factor, placement, in_tower)
    builder = _input_builder(
        processor,
        tile_policy if tile_policy is not None else saved.get("tile_policy"),
        use_chat_template if use_chat_template is not None else saved.get("use_chat_template", True),
        max_text_tokens if max_text_tokens is not None else saved.get("max_text_tokens", 256),
        pooled_token if pooled_token is not None else saved.get("pooled_token", "prompt_end" if saved else "eos"),
    )
    model = _load_model(name_or_path, config, ft.mode == "qlora", dtype, seed)
    # peft draws LoRA-A from the global RNG: seed it too, so the same seed gives the same trainable model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = apply_finetuning(model, ft)
    # transformers' from_pretrained returns the model in eval mode; a built backbone is for training (Lightning
    # otherwise keeps dropout off and warns "Found N module(s) in eval mode"). Inference callers call .eval().
    return VTCBackbone(model, factor, placement, input_builder=builder, in_tower_layer=in_tower).train()


def build_input_builder(name_or_path: str | Path = "tiny", vtc_factor: int | None = None,
                        tile_policy: TilePolicy | dict | None = None, use_chat_template: bool = True,
                        max_text_tokens: int = 256, pooled_token: str = "eos",
                        fast_images: bool = True) -> InputBuilder:
    """The input builder (templates + processor + tiling) for ``name_or_path`` at ``vtc_factor``, without a model.

    ``build_backbone`` calls this for the builder it attaches to the backbone; call it directly only where no
    model is needed (tools that only tokenise, tests of the data layer).

    ``fast_images=False`` preprocesses images with the stock processor instead of ``mmembed.backbone.pixels``.
    """
    processor, _ = load_processor(name_or_path, vtc_factor)
    return _input_builder(processor, tile_policy, use_chat_template, max_text_tokens, pooled_token, fast_images)


def _input_builder(processor, tile_policy: TilePolicy | dict | None, use_chat_template: bool, max_text_tokens: int,
                   pooled_token: str, fast_images: bool = True) -> InputBuilder:
    policy = tile_policy if isinstance(tile_policy, TilePolicy) or tile_policy is None else TilePolicy(**tile_policy)
    return InputBuilder(processor, policy, use_chat_template=use_chat_template, max_text_tokens=max_text_tokens,
                        pooled_token=pooled_token, fast_images=fast_images)
