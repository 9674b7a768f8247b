"""The public inference API: ``Embedder`` (contract)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from rich.progress import track

from mmembed.backbone.inputs import InputBuilder, TilePolicy
from mmembed.backbone.model import MMEMBED_CONFIG, VTCBackbone, build_backbone
from mmembed.types import Item, Role


class Embedder:
    """Encodes ``Item`` s into L2-normalised embeddings with a VTC InternVL3 backbone.

    Build it with ``Embedder.from_pretrained(preset_or_folder, vtc_factor=2)``; wrap an existing (e.g. trained)
    backbone with ``Embedder(backbone)`` (it uses the backbone's own input builder unless one is given).
    """

    def __init__(self, module: VTCBackbone, input_builder: InputBuilder | None = None) -> None:
        if input_builder is None:
            input_builder = module.input_builder
        module.check_processor(input_builder.processor)
        self.module = module
        self.input_builder = input_builder

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, vtc_factor: int | None = None, vtc_placement: str | None = None,
                        tile_policy: TilePolicy | dict | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, seed: int = 0, **builder_kwargs) -> Embedder:
        """Load from a preset name (random init) or a local folder (stock InternVL3-*-hf or mmembed-saved).

        Args:
            name_or_path: preset name or local folder. Nothing is ever fetched from a hub.
            vtc_factor: 1 (native), 2 (paper) or 4; default: the folder's recorded value, else 2.
            vtc_placement: ``pre_shuffle`` (default) or ``post_shuffle``.
            tile_policy: tile caps per kind; default: the folder's recorded policy, else natural 1 / document 4.
            device: where to run; default CUDA when available.
            dtype: parameter dtype; default the checkpoint's (fp32 for presets).
            seed: init seed for presets.
            **builder_kwargs: ``use_chat_template``, ``max_text_tokens``, ``pooled_token`` for the ``InputBuilder``.
        """
        module = build_backbone(name_or_path, vtc_factor, vtc_placement, finetune=None, dtype=dtype, seed=seed,
                                tile_policy=tile_policy, **builder_kwargs)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(module.to(device).eval())

    @property
    def backbone(self):
        """The underlying transformers model (``InternVLForConditionalGeneration``), for inspection."""
        return self.module.hf_model

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def embed_dim(self) -> int:
        return self.module.embed_dim

    def num_visual_tokens(self, item: Item) -> int:
        """Visual tokens this item costs (64 x tiles with factor 2 at 448px; 0 without image)."""
        return self.input_builder.num_visual_tokens(item)

    def _cost(self, item: Item) -> int:
        return len(item.text or "") // 4 + (self.num_visual_tokens(item) if item.image is not None else 0)

    @torch.no_grad()
    def encode(self, items: list[Item], role: Role = "query", batch_size: int = 16,
               show_progress: bool | None = None) -> torch.Tensor:
        """Embed items; returns a float32 (N, D) CPU tensor with L2-normalised rows, in input order.

        Items of similar length are batched together (less padding); a progress bar shows on long inputs.
        """
        if role not in ("query", "candidate"):
            raise ValueError(f"role must be 'query' or 'candidate', got {role!r}")
        if not items:
            return torch.empty(0, self.embed_dim)
        for i, it in enumerate(items):
            if not isinstance(it, Item):
                raise TypeError(f"item {i} is a {type(it).__name__}, not an mmembed.Item")
            if it.is_empty:
                raise ValueError(f"item {i} has neither text nor image; drop it or give it content")
        order = sorted(range(len(items)), key=lambda i: self._cost(items[i]))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if show_progress is None:
            show_progress = len(batches) > 8
        was_training = self.module.training
        self.module.eval()
        out = torch.empty(len(items), self.embed_dim)
        it = track(batches, description=f"encoding {role}s") if show_progress else batches
        try:
            for idx in it:
                batch = self.input_builder([items[i] for i in idx], role).to(self.device)
                out[idx] = self.module.embed(**batch).float().cpu()
        finally:
            self.module.train(was_training)
        return out

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a self-contained folder: merged weights (safetensors), config, processor, VTC settings.

        LoRA adapters are merged into a copy of the weights. The folder cannot silently lose compression: its
        ``config.json`` and ``processor_config.json`` record the *compressed* ``image_seq_length`` (64 per tile at
        factor 2), so a plain-transformers model (which makes 256 features per tile) fed by the exported processor
        stops with transformers' "Image features and image tokens do not match" instead of embedding without
        compression. ``Embedder.from_pretrained(path)`` restores compression, tiling and prompts from
        ``mmembed.json``; with plain transformers apply compression in two lines (docs/real_data.md)::

            model = InternVLForConditionalGeneration.from_pretrained(path)
            apply_vtc(model.model, model.config.vtc_factor, model.config.vtc_placement)  # mmembed.backbone.vtc
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self.module.model
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path, safe_serialization=True)  # config: compressed image_seq_length + vtc_* fields
        b = self.input_builder
        b.processor.save_pretrained(path)  # tokenizer, chat template, processor_config.json (image_seq_length)
        b.processor.image_processor.save_pretrained(path)
        # Name the stock class, so AutoProcessor builds InternVLProcessor (our subclass only drops the video part).
        proc_file = path / "processor_config.json"
        proc = json.loads(proc_file.read_text())
        proc["processor_class"] = "InternVLProcessor"
        proc_file.write_text(json.dumps(proc, indent=2))
        settings = {
            "vtc_factor": self.module.vtc_factor,
            "vtc_placement": self.module.vtc_placement,
            "tile_policy": {"natural": b.tile_policy.natural, "document": b.tile_policy.document},
            "use_chat_template": b.use_chat_template,
            "max_text_tokens": b.max_text_tokens,
            "pooled_token": b.pooled_token,
        }
        (path / MMEMBED_CONFIG).write_text(json.dumps(settings, indent=2))
        return path
