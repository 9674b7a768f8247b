"""The public inference API: ``Embedder`` (contract)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track

from mmembed.backbone.inputs import InputBuilder, TilePolicy
from mmembed.backbone.model import MMEMBED_CONFIG, VTCBackbone, build_backbone
from mmembed.backbone.templates import INSTRUCTIONS
from mmembed.integrations.export import saved_prompts, write_ecosystem_files
from mmembed.matryoshka import check_truncate_dim, truncate_embeddings
from mmembed.types import EncodeInput, Item, Role, as_item

log = logging.getLogger(__name__)

Precision = Literal["float32", "bfloat16", "float16"]
_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_prompts() -> dict[str, str]:
    """The paper's task instructions (Tables 11-12) as named prompts: ``"<dataset>-query"`` / ``"<dataset>-document"``.

    ``Embedder.encode(prompt_name="MSCOCO_t2i-query")`` and a sentence-transformers load of an exported folder
    (``encode_query(prompt_name="MSCOCO_t2i-query")``) read the same table.
    """
    prompts = {}
    for name, (_task, query_instruction, target_instruction) in INSTRUCTIONS.items():
        prompts[f"{name}-query"] = query_instruction
        prompts[f"{name}-document"] = target_instruction
    return prompts


def with_prompt(item: Item, prompt: str | None) -> Item:
    """``item`` with ``prompt`` as its instruction, unless it has its own (an item's own instruction wins)."""
    if not prompt or item.instruction is not None:
        return item
    return Item(text=item.text, image=item.image, instruction=prompt, kind=item.kind)


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

    ``prompts`` maps prompt names to instructions (default: :func:`default_prompts`, the paper's Tables 11-12);
    ``encode(prompt_name=...)`` reads it and ``save_pretrained`` writes it as the sentence-transformers prompts.
    """

    def __init__(self, module: VTCBackbone, input_builder: InputBuilder | None = None,
                 prompts: dict[str, str] | None = None) -> None:
        if input_builder is None:
            input_builder = module.input_builder
        module.check_processor(input_builder.processor)
        self.module = module
        self.input_builder = input_builder
        self.prompts = default_prompts() if prompts is None else dict(prompts)

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
        prompts = saved_prompts(Path(name_or_path)) if Path(name_or_path).is_dir() else None
        return cls(module.to(device).eval(), prompts=prompts)

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
        truncate_dim: int | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
    ) -> torch.Tensor | np.ndarray:
        """Embed inputs, the way sentence-transformers' ``encode`` is called.

        Inputs are batched by their real token count (prompt tokens + visual tokens), so a batch holds items of
        similar length and little padding is computed; the output follows the input order.

        Defaults that differ from sentence-transformers' ``encode``, and why:

        - ``normalize_embeddings=True`` (there ``False``): the model is trained with cosine InfoNCE on L2-normalised
          last-token states, so the normalised vector is its native output and inner product = cosine.
        - a ``torch.Tensor`` is returned (there a numpy array): the kit's callers (eval, mining, index) stay in
          torch; ``convert_to_numpy=True`` gives numpy.
        - ``batch_size=16`` (there 32): an image item costs 64 visual tokens per tile (up to 5 tiles for documents),
          so a batch of 16 multimodal items is already long.
        - ``precision`` is the *compute* dtype (autocast); there it is the *output quantisation* (int8 / binary).
        - a ``prompt`` is an *instruction* placed in the paper's template (``Instruct: ... Query: ...``), not a
          string prepended to the text, and ``role`` chooses the query or candidate template; ``encode_query`` /
          ``encode_document`` set the role as sentence-transformers' methods of the same names set ``task``.
        - a plain ``str`` is always text, never an image path or URL (use ``pathlib.Path`` or a dict); the
          sentence-transformers module of an exported folder follows sentence-transformers' rule instead.

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
            truncate_dim: Keep only the first ``truncate_dim`` coordinates (Matryoshka), L2-normalised again after
                the cut when ``normalize_embeddings`` (so cosine = inner product still holds); ``None`` (default)
                keeps all ``embed_dim``. It suits models trained with ``InfoNCELoss(matryoshka_dims=...)``.
            prompt_name: A key of ``self.prompts`` (e.g. ``"MSCOCO_t2i-query"``); its instruction is used as
                ``prompt``. Ignored (with a warning) when ``prompt`` is also given, as in sentence-transformers.
            prompt: An instruction for every input that has none of its own (an ``Item`` / dict ``instruction``
                wins). Default: no instruction line.

        Returns:
            (N, D) float32 embeddings on the CPU (D = ``truncate_dim`` if given), or (D,) for a single input.

        Raises:
            TypeError: An input of an unsupported type. ValueError: an empty item, a bad role, precision or
            prompt name.
        """
        prompt = self._resolve_prompt(prompt, prompt_name)
        if role not in ("query", "candidate"):
            raise ValueError(f"role must be 'query' or 'candidate', got {role!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        autocast_dtype = _autocast_dtype(precision)
        if truncate_dim is not None:
            check_truncate_dim(truncate_dim, self.embed_dim)
        single = not isinstance(inputs, list | tuple)
        items = [with_prompt(as_item(x, i), prompt) for i, x in enumerate([inputs] if single else inputs)]
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
        # Cutting the normalised rows and normalising again gives the same direction as cutting the raw hidden state.
        out = truncate_embeddings(out, truncate_dim, normalize=normalize_embeddings)
        if single:
            out = out[0]
        return out.numpy() if convert_to_numpy and not convert_to_tensor else out

    def _resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        if prompt_name is None:
            return prompt
        if prompt is not None:
            log.warning("both prompt and prompt_name given; using prompt and ignoring prompt_name=%r", prompt_name)
            return prompt
        if prompt_name not in self.prompts:
            examples = ", ".join(sorted(self.prompts)[:4])
            raise ValueError(f"unknown prompt_name {prompt_name!r}; use a key of Embedder.prompts (e.g. {examples}) "
                             "or pass the instruction as prompt=")
        return self.prompts[prompt_name]

    def encode_query(self, inputs: EncodeInput | Sequence[EncodeInput], prompt_name: str | None = None,
                     prompt: str | None = None, **kwargs) -> torch.Tensor | np.ndarray:
        """``encode`` with the query template (``role="query"``), as sentence-transformers' ``encode_query``.

        Without ``prompt`` / ``prompt_name`` the ``"query"`` prompt is used when ``self.prompts`` has one (as in
        sentence-transformers); the default prompts have none, so no instruction line. Other arguments: ``encode``.
        """
        if prompt_name is None and prompt is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(inputs, role="query", prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_document(self, inputs: EncodeInput | Sequence[EncodeInput], prompt_name: str | None = None,
                        prompt: str | None = None, **kwargs) -> torch.Tensor | np.ndarray:
        """``encode`` with the candidate template (``role="candidate"``), as sentence-transformers' ``encode_document``.

        Without ``prompt`` / ``prompt_name`` the first of the ``"document"``, ``"passage"``, ``"corpus"`` prompts
        present in ``self.prompts`` is used (as in sentence-transformers); the default prompts have none.
        """
        if prompt_name is None and prompt is None:
            prompt_name = next((n for n in ("document", "passage", "corpus") if n in self.prompts), None)
        return self.encode(inputs, role="candidate", prompt_name=prompt_name, prompt=prompt, **kwargs)

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
        ``mmembed.json``. The folder also loads with ``SentenceTransformer(path, trust_remote_code=True)`` and
        ``AutoProcessor.from_pretrained(path, trust_remote_code=True)`` (``mmembed.integrations.export``); with plain
        transformers apply compression in two lines (docs/real_data.md)::

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
        # sentence-transformers (modules.json, prompts) and AutoProcessor (image-only processor) files
        write_ecosystem_files(path, self.prompts)
        return path


def model_fingerprint(embedder: Any) -> str:
    """A hash of a few values of every parameter of ``embedder.module``: tells two models' embeddings apart.

    Cheap even for a 1B model, and enough to tell a stale file left by a run with other weights from this run's.
    Empty string for an embedder without a torch module (e.g. a test double).
    """
    module = getattr(embedder, "module", None)
    if not isinstance(module, torch.nn.Module):
        return ""
    h = hashlib.sha1()
    with torch.no_grad():
        for pname, p in module.named_parameters():
            flat = p.detach().flatten()
            probe = torch.cat([flat[:8], flat[-8:]]).float().cpu().numpy()
            h.update(f"{pname}{tuple(p.shape)}".encode() + probe.tobytes())
    return h.hexdigest()
