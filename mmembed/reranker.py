"""The public reranking API: ``Reranker`` (contract), the second stage of two-stage retrieval (paper §3.4, §5.2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from rich.progress import track
from torch import Tensor

from mmembed.backbone.inputs import InputBuilder, TilePolicy
from mmembed.backbone.model import VTCBackbone
from mmembed.backbone.rerank_inputs import MAX_LIST, RerankInputBuilder
from mmembed.losses.reranker import pointwise_scores
from mmembed.types import Item

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
    def _check(query: Item, candidates: Sequence[Item]) -> None:
        for i, it in enumerate([query, *candidates]):
            if not isinstance(it, Item):
                raise TypeError(f"{'query' if i == 0 else f'candidate {i - 1}'} is a {type(it).__name__}, "
                                "not an mmembed.Item")

    @torch.no_grad()
    def _logits(self, batch) -> Tensor:
        was_training = self.module.training
        self.module.eval()
        try:
            return self.module.answer_logits(**batch.to(self.device)).float().cpu()
        finally:
            self.module.train(was_training)

    def score(self, query: Item, candidates: Sequence[Item], batch_size: int | None = None,
              show_progress: bool | None = None) -> Tensor:
        """P(Yes) per candidate (pointwise), a float32 CPU tensor in candidate order.

        Args:
            query: The query item (instruction, text and/or image).
            candidates: The candidates to judge, each independently.
            batch_size: Prompts per forward (default: the reranker's).
            show_progress: Progress bar (default: when there are more than 8 batches).
        """
        self._check(query, candidates)
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

    def score_listwise(self, query: Item, candidates: Sequence[Item]) -> Tensor:
        """Probability that each listed position is the best candidate (one prompt; at most 9 candidates)."""
        self._check(query, candidates)
        if not 1 <= len(candidates) <= MAX_LIST:
            raise ValueError(f"listwise scoring takes 1..{MAX_LIST} candidates, got {len(candidates)}; rerank a "
                             "shorter shortlist or use mode='pointwise'")
        logits = self._logits(self.inputs.listwise([(query, list(candidates))]))
        return torch.softmax(logits[0, self.inputs.index_ids[: len(candidates)]], dim=-1)

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
