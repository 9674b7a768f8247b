"""Reranker model inputs (paper §3.4): the pointwise and listwise prompts, encoded, and their answer tokens.

The one home of reranker prompt construction, shared by training (``mmembed.datamodules.reranker``) and inference
(``mmembed.Reranker``). A query and its candidate(s) go into one prompt; every image keeps the tiling of its own
kind (natural 1 tile, document up to 4 + thumbnail), as the embedder tiles it.

Answer tokens: the model answers right after the assistant turn opens; the score reads the logits of the first token
of "Yes" / "No" (one token each in the Qwen2 vocabulary; the small BPE of the tiny presets splits them, and their
first tokens still differ) and of the digits "1".."9" for the listwise position (Qwen2 splits digits one by one).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import BatchFeature

from mmembed.backbone.inputs import InputBuilder
from mmembed.prompts.rerank import NO_ANSWER, YES_ANSWER, format_listwise, format_pointwise, format_rerank_side
from mmembed.types import Item

MAX_LIST = 9
"""Longest candidate list: the position index must be one digit token."""


def first_token_id(tokenizer, text: str) -> int:
    """Id of the first token of ``text`` as the tokenizer encodes it without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer encodes {text!r} to no token")
    return int(ids[0])


class RerankInputBuilder:
    """Builds padded reranker batches from ``(query, candidate)`` pairs or ``(query, [candidates])`` lists.

    Args:
        input_builder: The embedder's builder (processor, tile policy, chat template, text cap); reused as is.

    Attributes:
        yes_id, no_id: Answer token ids of the pointwise decision.
        index_ids: Token ids of "1".."9" (position ``k`` of a list is answered by ``index_ids[k]``).
    """

    def __init__(self, input_builder: InputBuilder) -> None:
        self.input_builder = input_builder
        tok = input_builder.tokenizer
        self.yes_id = first_token_id(tok, YES_ANSWER)
        self.no_id = first_token_id(tok, NO_ANSWER)
        self.index_ids = [first_token_id(tok, str(i)) for i in range(1, MAX_LIST + 1)]
        if self.yes_id == self.no_id or len(set(self.index_ids)) != MAX_LIST:
            raise ValueError("the tokenizer gives 'Yes'/'No' (or the digits 1-9) the same first token; the reranker "
                             "needs distinct answer tokens -- use the model's own tokenizer")

    # ---------------------------------------------------------------------------------------------- prompts
    def _side(self, item: Item, with_instruction: bool, images: list, index: int) -> str:
        if item.is_empty:
            raise ValueError(f"reranker item {index} has neither text nor image; drop it or give it content")
        b = self.input_builder
        if item.image is not None:
            images.append((item.image, item.kind))
        return format_rerank_side(b.cut(item.text), item.instruction if with_instruction else None,
                                  item.image is not None, b.image_token)

    def pointwise_prompt(self, query: Item, candidate: Item) -> tuple[str, list]:
        """``(prompt text, [(image, kind), ...])`` of the pointwise template, chat-wrapped."""
        images: list = []
        q = self._side(query, True, images, 0)
        c = self._side(candidate, False, images, 1)
        return self.input_builder.chat(format_pointwise(q, c)), images

    def listwise_prompt(self, query: Item, candidates: Sequence[Item]) -> tuple[str, list]:
        """``(prompt text, images)`` of the listwise template with the candidates numbered in the given order."""
        if not 1 <= len(candidates) <= MAX_LIST:
            raise ValueError(f"a listwise prompt takes 1..{MAX_LIST} candidates, got {len(candidates)}")
        images: list = []
        q = self._side(query, True, images, 0)
        cs = [self._side(c, False, images, i + 1) for i, c in enumerate(candidates)]
        return self.input_builder.chat(format_listwise(q, cs)), images

    # ---------------------------------------------------------------------------------------------- batches
    def pointwise(self, pairs: Sequence[tuple[Item, Item]]) -> BatchFeature:
        """Model inputs (right-padded) for ``(query, candidate)`` pairs; the answer position is each row's last."""
        b = self.input_builder
        return b.collate([b.encode_prompt(*self.pointwise_prompt(q, c), what=f"pair {i}")
                          for i, (q, c) in enumerate(pairs)])

    def listwise(self, lists: Sequence[tuple[Item, Sequence[Item]]]) -> BatchFeature:
        """Model inputs (right-padded) for ``(query, candidates)`` lists."""
        b = self.input_builder
        return b.collate([b.encode_prompt(*self.listwise_prompt(q, cs), what=f"list {i}")
                          for i, (q, cs) in enumerate(lists)])
