"""The public reranking API: ``Reranker`` (contract), the second stage of two-stage retrieval (paper §3.4, §5.2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import track
from torch import Tensor

from mmembed.backbone.inputs import InputBuilder, TilePolicy
from mmembed.backbone.model import VTCBackbone
from mmembed.backbone.rerank_inputs import MAX_LIST, RerankInputBuilder
from mmembed.losses.reranker import pointwise_scores
from mmembed.types import EncodeInput, Item, as_item

MODES = ("pointwise", "listwise")


class Reranker:
    """Scores a query's candidates with the generative VTC backbone trained by ``RerankerModule``.

    ``mode="pointwise"`` (the paper's inference mode): one prompt per candidate, score = P(Yes) = softmax over the
    (No, Yes) answer logits. ``mode="listwise"``: one prompt listing all candidates (at most 9), score = the
    probability of each position's index token. :meth:`rerank` (the eval runners' hook,
    ``mmembed.eval.results.SupportsRerank``) uses the chosen mode.

    Build with ``Reranker.from_pretrained(folder_or_preset)``, or wrap a backbone: ``Reranker(backbone, builder)``.
    """

    def __init__(self, module: VTCBackbone, input_builder: InputBuilder | None = None, mode: str = "pointwise",
                 batch_size: int = 8) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        input_builder = input_builder if input_builder is not None else module.input_builder
        module.check_processor(input_builder.processor)
        self.module = module
        self.input_builder = input_builder
        self.inputs = RerankInputBuilder(input_builder)
        self.mode = mode
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, mode: str = "pointwise", batch_size: int = 8,
                        vtc_factor: int | None = None, vtc_placement: str | None = None,
                        tile_policy: TilePolicy | dict | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, seed: int = 0, **builder_kwargs) -> Reranker:
        """Load from a folder (written by ``save_pretrained``, or any InternVL3-*-hf / mmembed folder) or a preset.

        Loading is the ``Embedder``'s (same weights, compression, tiling and chat settings); see
        :meth:`mmembed.Embedder.from_pretrained` for the arguments. A preset gives random weights (pipeline tests).
        """
        from mmembed.embedder import Embedder

        emb = Embedder.from_pretrained(name_or_path, vtc_factor=vtc_factor, vtc_placement=vtc_placement,
                                       tile_policy=tile_policy, device=device, dtype=dtype, seed=seed,
                                       **builder_kwargs)
        return cls(emb.module, emb.input_builder, mode=mode, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @staticmethod
    def _items(query: EncodeInput, candidates: Sequence[EncodeInput]) -> tuple[Item, list[Item]]:
        """The query and candidates as ``Item`` s, from anything ``Embedder.encode`` accepts (``mmembed.as_item``)."""
        if isinstance(candidates, str | Item) or not isinstance(candidates, Sequence):
            raise TypeError(f"candidates must be a list of inputs, got a {type(candidates).__name__}")
        items = []
        for i, value in enumerate([query, *candidates]):
            try:
                items.append(as_item(value, i))
            except TypeError as exn:
                what = "query" if i == 0 else f"candidate {i - 1}"
                raise TypeError(f"{what}: {exn}") from None
        for i, it in enumerate(items):
            if it.is_empty:
                raise ValueError(f"{'query' if i == 0 else f'candidate {i - 1}'} has neither text nor image")
        return items[0], items[1:]

    @torch.no_grad()
    def _logits(self, batch) -> Tensor:
        was_training = self.module.training
        self.module.eval()
        try:
            return self.module.answer_logits(**batch.to(self.device)).float().cpu()
        finally:
            self.module.train(was_training)

    def score(self, query: EncodeInput, candidates: Sequence[EncodeInput], batch_size: int | None = None,
              show_progress: bool | None = None) -> Tensor:
        """P(Yes) per candidate (pointwise), a float32 CPU tensor in candidate order.

        Args:
            query: The query: what ``Embedder.encode`` accepts (``Item``, ``str`` text, ``PIL.Image``,
                ``pathlib.Path`` image file, or a ``text/image/instruction/kind`` dict).
            candidates: The candidates to judge, each independently (same input types).
            batch_size: Prompts per forward (default: the reranker's).
            show_progress: Progress bar (default: when there are more than 8 batches).
        """
        query, candidates = self._items(query, candidates)
        if not candidates:
            return torch.empty(0)
        bs = batch_size or self.batch_size
        chunks = [list(range(i, min(i + bs, len(candidates)))) for i in range(0, len(candidates), bs)]
        if show_progress is None:
            show_progress = len(chunks) > 8
        out = torch.empty(len(candidates))
        for idx in track(chunks, description="reranking") if show_progress else chunks:
            logits = self._logits(self.inputs.pointwise([(query, candidates[i]) for i in idx]))
            out[idx] = pointwise_scores(logits, self.inputs.yes_id, self.inputs.no_id)
        return out

    def score_listwise(self, query: EncodeInput, candidates: Sequence[EncodeInput]) -> Tensor:
        """Probability that each listed position is the best candidate (one prompt; at most 9 candidates)."""
        query, candidates = self._items(query, candidates)
        if not 1 <= len(candidates) <= MAX_LIST:
            raise ValueError(f"listwise scoring takes 1..{MAX_LIST} candidates, got {len(candidates)}; rerank a "
                             "shorter shortlist or use mode='pointwise'")
        logits = self._logits(self.inputs.listwise([(query, list(candidates))]))
        return torch.softmax(logits[0, self.inputs.index_ids[: len(candidates)]], dim=-1)

    def rank(self, query: EncodeInput, documents: Sequence[EncodeInput], top_k: int | None = None,
             return_documents: bool = False, batch_size: int | None = None,
             show_progress_bar: bool | None = None) -> list[dict[str, Any]]:
        """Documents sorted by relevance to the query, as sentence-transformers' ``CrossEncoder.rank`` returns them.

        Scores are ``self.mode``'s (pointwise P(Yes) by default; listwise for at most 9 documents). Ties keep the
        input order.

        Args:
            query: The query (any input ``Embedder.encode`` accepts).
            documents: The documents to rank (same input types).
            top_k: Keep the best ``top_k``; ``None`` keeps all.
            return_documents: Add each document, as given, under ``"text"`` (sentence-transformers' key, also for
                images and dicts).
            batch_size: Prompts per forward (pointwise; default: the reranker's).
            show_progress_bar: Progress bar (pointwise; default: when there are more than 8 batches).

        Returns:
            ``[{"corpus_id": index, "score": float, ["text": document]}, ...]``, best first.
        """
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if self.mode == "listwise":
            scores = self.score_listwise(query, documents)
        else:
            scores = self.score(query, documents, batch_size=batch_size, show_progress=show_progress_bar)
        order = sorted(range(len(documents)), key=lambda i: -float(scores[i]))[:top_k]
        ranked = []
        for i in order:
            row: dict[str, Any] = {"corpus_id": i, "score": float(scores[i])}
            if return_documents:
                row["text"] = documents[i]
            ranked.append(row)
        return ranked

    def rerank(self, query: Item, candidates: Sequence[Item]) -> Tensor:
        """Relevance scores in candidate order (higher = better), by ``self.mode``: the E+R hook of the runners."""
        if self.mode == "listwise":
            return self.score_listwise(query, candidates)
        return self.score(query, candidates, show_progress=False)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a self-contained folder (merged LoRA, stock config, tokenizer, image processor, VTC settings).

        The layout is the ``Embedder``'s: ``InternVLForConditionalGeneration.from_pretrained(path)`` loads every
        weight (LM head included) in plain transformers, and ``Reranker.from_pretrained(path)`` restores it.
        """
        from mmembed.embedder import Embedder

        return Embedder(self.module, self.input_builder).save_pretrained(path)
