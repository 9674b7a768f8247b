"""MLLM-as-a-judge (§3.3 "Stage 3"): relevance of (query, target) pairs from the next-token logits of 'yes'/'no'.

Any local image-text-to-text checkpoint folder loads through the stock ``AutoProcessor`` +
``AutoModelForImageTextToText`` and is prompted with its own chat template (tested: InternVL-hf, Qwen2-VL,
Qwen2.5-VL, Qwen3-VL); folders written by ``Embedder.save_pretrained`` (and presets) load through the kit's own
backbone code so that visual token compression is restored. Without torchvision the stock processors cannot build
their video processor; the loader then builds the same processor class without it (:func:`image_only_processor_class`).

The prompt is the paper's judgment template with the instruction of Table 13 (:mod:`mmembed.prompts.judge`). The
score is ``logit(yes) - logit(no)`` of the first answer token; both logits are kept. ``yes``/``no`` token ids come
from the judge's tokenizer: every single-token spelling among ``yes``, ``Yes``, ``YES`` with and without a leading
space; a word's logit is the largest over its spellings (the spelling the model prefers).

Prefix reuse: the template puts the query before the target, so the K candidates of one query share every token up
to ``Target:``. With ``reuse_prefix=True`` the shared prefix is run once and its KV cache is copied to the batch of
candidates. This needs 1-D rotary positions (InternVL / the kit); models with multimodal (3-D) rotary positions,
such as the Qwen-VL family, are scored without reuse.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import track

from mmembed.backbone.inputs import load_image
from mmembed.prompts.judge import JUDGE_HEAD, JUDGE_MIDDLE, JUDGE_TAIL
from mmembed.types import Item

log = logging.getLogger(__name__)

ANSWER_WORDS = ("yes", "no")
PREFIX_REUSE_MODEL_TYPES = ("internvl",)
_SPLIT = "\u2063JUDGE-SPLIT\u2063"  # marks the end of the shared prefix in the rendered prompt, removed before use


@dataclass
class JudgePair:
    """One (query, target) pair with its judgment instruction (Table 13)."""

    query: Item
    target: Item
    instruction: str


@dataclass
class JudgeScores:
    """Next-token logits of 'yes' and 'no' per pair (float32, CPU)."""

    yes: torch.Tensor
    no: torch.Tensor

    @property
    def score(self) -> torch.Tensor:
        """``logit(yes) - logit(no)``: > 0 means relevant (the paper's decision rule)."""
        return self.yes - self.no

    @property
    def relevant(self) -> torch.Tensor:
        return self.yes > self.no


def answer_token_ids(tokenizer, word: str) -> list[int]:
    """Single-token ids of a word's spellings (as is, Capitalised, UPPER; with and without a leading space).

    Raises:
        ValueError: No spelling is one token in this vocabulary; the message names the tokenizer.
    """
    ids: list[int] = []
    for v in (word, word.capitalize(), word.upper()):
        for spelled in (v, " " + v):
            enc = tokenizer.encode(spelled, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(int(enc[0]))
    if not ids:
        raise ValueError(f"the judge's tokenizer ({type(tokenizer).__name__}, {len(tokenizer)} tokens) has no single "
                         f"token for {word!r} in any spelling; use a judge whose vocabulary has one")
    return ids


def image_only_processor_class(cls: type) -> type:
    """The stock processor class ``cls`` without its video processor (which needs torchvision).

    Why: ``ProcessorMixin`` derives its sub-processors from the ``__init__`` signature and refuses to build without
    a video processor class; an ``__init__`` that names only the image processor and tokenizer keeps the rest of the
    stock class (placeholder expansion, chat template, saving) unchanged.
    """

    class ImageOnly(cls):  # type: ignore[misc, valid-type]
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            kwargs.pop("video_processor", None)
            super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    # Advertise the stock signature minus the video processor, so loading and saving keep the stock class's own
    # settings (e.g. InternVL's ``image_seq_length``), which transformers matches against the signature.
    stock = inspect.signature(cls.__init__)
    ImageOnly.__init__.__signature__ = stock.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in stock.parameters.items() if name != "video_processor"])
    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly


def _load_stock_processor(path: Path, model_type: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ImportError, AttributeError, ValueError) as err:
        import transformers
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        name = PROCESSOR_MAPPING_NAMES.get(model_type)
        if name is None:
            raise ValueError(f"{path}: AutoProcessor failed ({err}) and model type {model_type!r} has no known "
                             "processor class") from err
        log.info("%s: AutoProcessor failed (%s); loading %s without its video processor", path, err, name)
        processor = image_only_processor_class(getattr(transformers, name)).from_pretrained(path)
        # transformers passes saved settings only if they are named in ``__init__``'s code object, which the
        # image-only wrapper cannot change: restore plain settings (e.g. InternVL's image_seq_length) by hand.
        cfg = path / "processor_config.json"
        saved = json.loads(cfg.read_text()) if cfg.is_file() else {}
        for key, value in saved.items():
            if not isinstance(value, dict) and key != "processor_class" and hasattr(processor, key):
                setattr(processor, key, value)
        return processor


class _ImageMemo:
    """Stands in for a processor's ``image_processor`` during one :meth:`Judge.score` call.

    The K candidates of a query repeat the query's image, and a candidate image recurs across the queries that
    retrieve it; each distinct image object is processed once and its outputs reused (least recently used first out,
    within ``max_bytes``). transformers' processors have no such cache. A multi-image call is answered image by image
    and the parts joined the way batched image processors return them (tensors and arrays along dim 0, lists
    extended); an output it cannot join falls back to the wrapped processor on the whole call.

    Entries keep a reference to their image, so an object id cannot be reused while its entry lives.
    """

    def __init__(self, inner: Any, max_bytes: int = 1 << 30) -> None:
        self.inner = inner
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, str], tuple[Any, Any, int]] = OrderedDict()
        self.size = 0
        self.hits = self.misses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _one(self, image: Any, kwargs: dict[str, Any]) -> Any:
        key = (id(image), repr(sorted(kwargs.items())))
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return hit[1]
        self.misses += 1
        out = self.inner([image], **kwargs)
        nbytes = sum(v.nbytes if isinstance(v, np.ndarray) else v.numel() * v.element_size()
                     for v in out.values() if isinstance(v, np.ndarray | torch.Tensor))
        self.entries[key] = (image, out, nbytes)
        self.size += nbytes
        while self.size > self.max_bytes and len(self.entries) > 1:
            self.size -= self.entries.popitem(last=False)[1][2]
        return out

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        flat = images if isinstance(images, list | tuple) else [images]
        if not flat or any(isinstance(i, list | tuple) for i in flat):
            return self.inner(images, **kwargs)
        parts = [self._one(image, kwargs) for image in flat]
        if len(parts) == 1:
            return parts[0]
        joined: dict[str, Any] = {}
        for key in parts[0]:
            values = [part[key] for part in parts]
            if all(isinstance(v, torch.Tensor) for v in values):
                joined[key] = torch.cat(values)
            elif all(isinstance(v, np.ndarray) for v in values):
                joined[key] = np.concatenate(values)
            elif all(isinstance(v, list) for v in values):
                joined[key] = [x for v in values for x in v]
            else:
                return self.inner(images, **kwargs)
        return type(parts[0])(joined)


class Judge:
    """Scores (query, target) pairs with a generative MLLM.

    Args:
        model: An image-text-to-text model (``*ForConditionalGeneration``) with ``base_model`` and an output
            embedding (LM head).
        processor: Its processor (tokenizer + image processor, placeholder expansion). A processor without a chat
            template (the kit's) renders images as ``<image token>\\n`` inside the tokenizer's string chat template,
            the layout the kit's stage-1 conversations are trained in.
    """

    def __init__(self, model: torch.nn.Module, processor) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.yes_ids = answer_token_ids(self.tokenizer, "yes")
        self.no_ids = answer_token_ids(self.tokenizer, "no")
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"'yes' and 'no' share token ids {set(self.yes_ids) & set(self.no_ids)}")
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        self.model_type = getattr(model.config, "model_type", "")
        self._loaded: dict[int, tuple[Any, Any]] | None = None  # decoded images, during a score() call only
        # transformers 5.2x renamed ``past_key_values`` to ``cache``; older 5.x releases only know the first.
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, vtc_factor: int | None = None, seed: int = 0) -> Judge:
        """Load a judge from a local folder (any image-text-to-text checkpoint, or a kit-saved one) or a preset.

        Args:
            name_or_path: Checkpoint folder, or a kit preset name (random init; for tests).
            device: Default CUDA when available.
            dtype: Default bfloat16 on CUDA, float32 on CPU.
            vtc_factor: Kit folders/presets only: override the recorded compression.
            seed: Init seed for presets.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        from mmembed.backbone.model import MMEMBED_CONFIG, _is_folder, build_backbone, load_processor

        path = Path(name_or_path)
        if not _is_folder(name_or_path) or (path / MMEMBED_CONFIG).is_file():
            backbone = build_backbone(name_or_path, vtc_factor, finetune=None, dtype=dtype, seed=seed)
            processor, _ = load_processor(name_or_path, backbone.vtc_factor)
            return cls(backbone.hf_model.to(device), processor)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint folder (no config.json)")
        from transformers import AutoConfig, AutoModelForImageTextToText

        config = AutoConfig.from_pretrained(path)
        processor = _load_stock_processor(path, config.model_type)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        return cls(model.to(device), processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def label(self) -> str:
        """What curation outputs call this judge (summary, manifest, MLflow tags): ``"MLLM judge"``."""
        return "MLLM judge"

    @property
    def display_name(self) -> str:
        """The label with the model type, for log lines and run names."""
        return f"MLLM judge ({self.model_type or 'unknown'})"

    @property
    def settings(self) -> dict[str, Any]:
        """What the summary records about this judge."""
        return {"model_type": self.model_type}

    # ---------------------------------------------------------------------------------------------- prompts
    def _parts(self, pair: JudgePair) -> list[tuple[str, object]]:
        parts: list[tuple[str, object]] = [("text", JUDGE_HEAD.format(instruction=pair.instruction))]
        for side, after in ((pair.query, JUDGE_MIDDLE.rstrip(" ") + _SPLIT + " "), (pair.target, JUDGE_TAIL)):
            if side.image is not None:
                parts.append(("image", self._load(side.image)))
            parts.append(("text", (side.text or "") + after))
        return parts

    def _load(self, image: Any) -> Any:
        """``load_image``, once per source object during a ``score`` call (the entry keeps the source alive, so its
        id is not reused)."""
        loaded = self._loaded
        if loaded is None:
            return load_image(image, what="judge pair")
        hit = loaded.get(id(image))
        if hit is None:
            hit = loaded[id(image)] = (image, load_image(image, what="judge pair"))
        return hit[1]

    def render(self, pair: JudgePair) -> tuple[str, str, list, list]:
        """``(prompt, shared_prefix, query_images, target_images)``; the prefix ends with ``Target:``."""
        parts = self._parts(pair)
        images = [p for kind, p in parts if kind == "image"]
        n_query_images = int(pair.query.image is not None)
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"} if kind == "image" else {"type": "text", "text": p} for kind, p in parts]
            text = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
        else:
            token = self.processor.image_token
            body = "".join(f"{token}\n" if kind == "image" else str(p) for kind, p in parts)
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                      add_generation_prompt=True)
        cut = text.index(_SPLIT)
        return text.replace(_SPLIT, ""), text[:cut], images[:n_query_images], images[n_query_images:]

    def _process(self, text: str, images: list) -> dict[str, torch.Tensor]:
        return dict(self.processor(text=[text], images=images or None, return_tensors="pt"))

    def _collate(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad per-token tensors; concatenate the rest (pixel values, grids) along dim 0."""
        lengths = [e["input_ids"].shape[1] for e in encoded]
        width = max(lengths)
        out: dict[str, torch.Tensor] = {}
        for key in dict.fromkeys(k for e in encoded for k in e):  # every key, in order: row 0 may have no image
            vals = [e[key] for e in encoded if key in e]
            if all(v.ndim == 2 and v.shape[1] == n for v, n in zip(vals, lengths)) and len(vals) == len(encoded):
                fill = self.pad_id if key == "input_ids" else 0
                out[key] = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill) for v in vals])
            else:
                out[key] = torch.cat(vals)
        return out

    def _answer_logits(self, hidden: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = self.model.get_output_embeddings()(h).float()
        return logits[:, self.yes_ids].amax(-1).cpu(), logits[:, self.no_ids].amax(-1).cpu()

    def _forward(self, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return self.model.base_model(**batch, **kwargs).last_hidden_state

    # ---------------------------------------------------------------------------------------------- scoring
    def _score_plain(self, pairs: Sequence[JudgePair]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [self._process(text, q + t) for text, _, q, t in map(self.render, pairs)]
        batch = self._collate(encoded)
        last = batch["attention_mask"].sum(1) - 1
        hidden = self._forward(batch, use_cache=False)
        return self._answer_logits(hidden, last.to(hidden.device))

    def _score_shared(self, pairs: Sequence[JudgePair], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs of one query: run the shared prefix once, then the targets in batches on copies of its cache."""
        rendered = [self.render(p) for p in pairs]
        prefix = self._process(rendered[0][1], rendered[0][2])
        p_len = prefix["input_ids"].shape[1]
        full = [self._process(text, q + t) for text, _, q, t in rendered]
        if any(not torch.equal(f["input_ids"][0, :p_len], prefix["input_ids"][0]) or f["input_ids"].shape[1] <= p_len
               for f in full):  # the tokeniser merged across the split: no shared prefix to reuse
            parts = [self._score_plain(pairs[s : s + batch_size]) for s in range(0, len(pairs), batch_size)]
            return torch.cat([y for y, _ in parts]), torch.cat([n for _, n in parts])
        n_prefix_rows = prefix["pixel_values"].shape[0] if "pixel_values" in prefix else 0
        out = self.model.base_model(**{k: v.to(self.device) for k, v in self._cast(prefix).items()}, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        yes, no = [], []
        for s in range(0, len(full), batch_size):
            chunk = full[s : s + batch_size]
            suffix = []
            for f in chunk:
                e = {"input_ids": f["input_ids"][:, p_len:], "attention_mask": f["attention_mask"][:, p_len:]}
                if "pixel_values" in f and f["pixel_values"].shape[0] > n_prefix_rows:
                    e["pixel_values"] = f["pixel_values"][n_prefix_rows:]
                suffix.append(e)
            batch = self._collate(suffix)
            last = batch["attention_mask"].sum(1) - 1
            batch["attention_mask"] = torch.cat([torch.ones(len(chunk), p_len, dtype=batch["attention_mask"].dtype),
                                                 batch["attention_mask"]], dim=1)
            chunk_cache = copy.deepcopy(cache)
            chunk_cache.batch_repeat_interleave(len(chunk))
            hidden = self._forward(batch, **{self._cache_kw: chunk_cache}, use_cache=True)
            y, n = self._answer_logits(hidden, last.to(hidden.device))
            yes.append(y)
            no.append(n)
        return torch.cat(yes), torch.cat(no)

    def _cast(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "pixel_values" in batch:
            batch = {**batch, "pixel_values": batch["pixel_values"].to(self.model.dtype)}
        return batch

    @property
    def supports_prefix_reuse(self) -> bool:
        return self.model_type in PREFIX_REUSE_MODEL_TYPES

    @torch.no_grad()
    def score(self, pairs: Sequence[JudgePair], *, batch_size: int = 8, reuse_prefix: bool = False,
              show_progress: bool | None = None) -> JudgeScores:
        """Judge pairs; returns the 'yes' and 'no' logits of each, in input order.

        Args:
            pairs: The pairs. With ``reuse_prefix``, consecutive pairs whose ``query`` is the same object and whose
                instruction is equal form one group sharing a prefix.
            batch_size: Pairs per forward pass (targets per pass with prefix reuse).
            reuse_prefix: Run each group's shared prefix once (see the module docstring). Ignored, with a log line,
                for models whose positions are not 1-D.
            show_progress: A rich progress bar; default when there are more than 8 batches.
        """
        if not pairs:
            return JudgeScores(torch.empty(0), torch.empty(0))
        if reuse_prefix and not self.supports_prefix_reuse:
            log.info("judge: prefix reuse needs 1-D positions; %s is scored without it", self.model_type)
            reuse_prefix = False
        if reuse_prefix:
            units, start = [], 0
            for i in range(1, len(pairs) + 1):
                if i == len(pairs) or pairs[i].query is not pairs[start].query or \
                        pairs[i].instruction != pairs[start].instruction:
                    units.append(range(start, i))
                    start = i
        else:
            units = [range(s, min(s + batch_size, len(pairs))) for s in range(0, len(pairs), batch_size)]
        show = len(units) > 8 if show_progress is None else show_progress
        yes, no = torch.empty(len(pairs)), torch.empty(len(pairs))
        # One decode and one image preprocessing per distinct image object for the whole call (see _ImageMemo).
        inner = self.processor.image_processor
        self.processor.image_processor = memo = _ImageMemo(inner)
        self._loaded = {}
        try:
            for unit in (track(units, description="judging") if show else units):
                chunk = [pairs[i] for i in unit]
                y, n = self._score_shared(chunk, batch_size) if reuse_prefix else self._score_plain(chunk)
                yes[list(unit)], no[list(unit)] = y, n
        finally:
            self.processor.image_processor = inner
            self._loaded = None
        log.debug("judge: images preprocessed %d, reused %d", memo.misses, memo.hits)
        return JudgeScores(yes, no)
