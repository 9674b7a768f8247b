"""The public inference API: ``Embedder`` (contract)."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track

from mmembed.backbone.inputs import InputBuilder, TilePolicy
from mmembed.backbone.model import MMEMBED_CONFIG, VTCBackbone, build_backbone
from mmembed.types import EncodeInput, Item, Role, as_item

Precision = Literal["float32", "bfloat16", "float16"]
_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _autocast_dtype(precision: str | None) -> torch.dtype | None:
    if precision is None:
        return None
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    return _PRECISIONS[precision]


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
                        dtype: torch.dtype | str | None = None, seed: int = 0,
                        in_tower_layer: int | str | None = None, **builder_kwargs) -> Embedder:
        """Load from a preset name (random init) or a local folder (stock InternVL3-*-hf or mmembed-saved).

        Args:
            name_or_path: preset name or local folder. Nothing is ever fetched from a hub.
            vtc_factor: 1 (native), 2 (paper) or 4; default: the folder's recorded value, else 2.
            vtc_placement: ``pre_shuffle`` (default) or ``post_shuffle``.
            tile_policy: tile caps per kind; default: the folder's recorded policy, else natural 1 / document 4.
            device: where to run; default CUDA when available.
            dtype: parameter dtype; default the checkpoint's (fp32 for presets).
            seed: init seed for presets.
            in_tower_layer: in-tower compression after vision block ``k`` (``mmembed.backbone.vtc``); ``"off"``
                for none; default: the folder's recorded value, else off.
            **builder_kwargs: ``use_chat_template``, ``max_text_tokens``, ``pooled_token`` for the ``InputBuilder``.
        """
        module = build_backbone(name_or_path, vtc_factor, vtc_placement, finetune=None, dtype=dtype, seed=seed,
                                tile_policy=tile_policy, in_tower_layer=in_tower_layer, **builder_kwargs)
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

    @torch.no_grad()
    def encode(
        self,
        inputs: EncodeInput | Sequence[EncodeInput],
        role: Role = "query",
        batch_size: int = 16,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = True,
        device: str | torch.device | None = None,
        precision: Precision | None = None,
        sort_by_length: bool = True,
        show_progress: bool | None = None,
    ) -> torch.Tensor | np.ndarray:
        """Embed inputs, the way sentence-transformers' ``encode`` is called.

        Inputs are batched by their real token count (prompt tokens + visual tokens), so a batch holds items of
        similar length and little padding is computed; the output follows the input order.

        Args:
            inputs: One input or a list of them: ``Item``, ``str`` (text), ``PIL.Image``, ``pathlib.Path`` (an image
                file; a plain ``str`` is always text) or a dict with ``text/image/instruction/kind``.
            role: ``"query"`` or ``"candidate"`` -- which of the paper's templates wraps the input.
            batch_size: Items per forward pass.
            show_progress_bar: Progress bar over batches; default when there are more than 8 batches.
            convert_to_numpy: Return a ``np.ndarray`` instead of a tensor.
            convert_to_tensor: Return a ``torch.Tensor`` (the default here; it wins over ``convert_to_numpy``).
            normalize_embeddings: L2-normalise the rows (the model's native output; cosine = inner product).
            device: Run on this device; the model is moved there and stays (as in sentence-transformers).
            precision: Compute dtype: ``"float32"`` (no autocast), ``"bfloat16"`` or ``"float16"`` (autocast);
                default: the weights' dtype. The output is float32 either way.
            sort_by_length: Batch by token count (default); ``False`` batches in input order (for comparison).
            show_progress: Deprecated alias of ``show_progress_bar``.

        Returns:
            (N, D) float32 embeddings on the CPU, or (D,) for a single (non-list) input.

        Raises:
            TypeError: An input of an unsupported type. ValueError: an empty item, a bad role or precision.
        """
        if role not in ("query", "candidate"):
            raise ValueError(f"role must be 'query' or 'candidate', got {role!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        autocast_dtype = _autocast_dtype(precision)
        single = not isinstance(inputs, list | tuple)
        items = [as_item(x, i) for i, x in enumerate([inputs] if single else inputs)]
        for i, it in enumerate(items):
            if it.is_empty:
                raise ValueError(f"item {i} has neither text nor image; drop it or give it content")
        if device is not None and torch.device(device) != self.device:
            self.module.to(device)
        out = torch.empty(len(items), self.embed_dim)
        if items:
            if sort_by_length:
                lengths = self.input_builder.num_tokens(items, role)
                order = sorted(range(len(items)), key=lengths.__getitem__)
            else:
                order = list(range(len(items)))
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            show = show_progress_bar if show_progress_bar is not None else show_progress
            show = len(batches) > 8 if show is None else show
            dev = self.device
            was_training = self.module.training
            self.module.eval()
            try:
                for idx in track(batches, description=f"encoding {role}s") if show else batches:
                    batch = self.input_builder([items[i] for i in idx], role).to(dev)
                    with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        emb = self.module.embed(**batch, normalize=normalize_embeddings)
                    out[idx] = emb.float().cpu()
            finally:
                self.module.train(was_training)
        if single:
            out = out[0]
        return out.numpy() if convert_to_numpy and not convert_to_tensor else out

    @staticmethod
    def similarity(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Cosine similarity matrix (N, M) between two sets of embeddings (1-D inputs count as one row)."""
        a_t, b_t = (torch.as_tensor(x, dtype=torch.float32) for x in (a, b))
        a_t, b_t = (x.unsqueeze(0) if x.ndim == 1 else x for x in (a_t, b_t))
        if a_t.shape[-1] != b_t.shape[-1]:
            raise ValueError(f"embeddings must share their dimension, got {a_t.shape[-1]} and {b_t.shape[-1]}")
        return F.normalize(a_t, dim=-1) @ F.normalize(b_t, dim=-1).T

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a self-contained folder: merged weights (safetensors), config, processor, VTC settings.

        LoRA adapters are merged into a copy of the weights. The folder cannot silently lose compression: its
        ``config.json`` and ``processor_config.json`` record the *compressed* ``image_seq_length`` (64 per tile at
        factor 2), so a plain-transformers model (which makes 256 features per tile) fed by the exported processor
        stops with transformers' "Image features and image tokens do not match" instead of embedding without
        compression. ``Embedder.from_pretrained(path)`` restores compression, tiling and prompts from
        ``mmembed.json``; with plain transformers apply compression in two lines (docs/real_data.md)::

            model = InternVLForConditionalGeneration.from_pretrained(path)
            apply_vtc(model.model, model.config.vtc_factor, model.config.vtc_placement,  # mmembed.backbone.vtc
                      getattr(model.config, "vtc_in_tower_layer", None))
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
            "vtc_in_tower_layer": self.module.in_tower_layer,
            "tile_policy": {"natural": b.tile_policy.natural, "document": b.tile_policy.document},
            "use_chat_template": b.use_chat_template,
            "max_text_tokens": b.max_text_tokens,
            "pooled_token": b.pooled_token,
        }
        (path / MMEMBED_CONFIG).write_text(json.dumps(settings, indent=2))
        return path
