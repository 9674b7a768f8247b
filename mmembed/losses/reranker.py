"""Reranker objectives (paper §3.4, eq. 5-6) and the stage-1 next-token loss (eq. 4), as pure functions.

All functions take logits from a causal LM. The logits at position ``t`` predict token ``t + 1``, so the answer of a
reranking prompt is read at the last prompt position (:func:`answer_logits`).

Pointwise (eq. 5): the model answers 'Yes' for (q, c+) and 'No' for (q, c-). By default the cross-entropy is
taken over the two answer tokens only (``full_vocab=False``): the score used at inference is the softmax over
exactly these two logits, so training the same two-way decision keeps train and test consistent. With
``full_vocab=True`` it is the language-model cross-entropy over the whole vocabulary ("standard CE" read
literally), which also pushes every other token down.

Listwise (eq. 6): M hard negatives and one positive are listed as "(1) ... (M+1)"; the model must answer the
positive's position. The loss is a cross-entropy over the tokens of "1".."M+1" (each must be a single token,
true for M + 1 <= 9 with the Qwen2 tokenizer); per-sample M may differ in a batch via ``num_candidates``.

Eq. 5 sums one positive and one negative pair per query. With one pair of each per query, ``reduction="mean"``
over the pairs is half of eq. 5 averaged over queries -- a constant factor; ``reduction="sum"`` divided by the
number of queries follows the paper to the letter (and keeps its 1:1 weighting against eq. 6).

Stage 1: ``transformers``' ``*ForConditionalGeneration`` models return ``.loss`` when given ``labels`` (shifted,
masked at -100, mean over supervised tokens; ``num_items_in_batch=`` turns it into a sum divided by a global token
count). The module should use that loss. :func:`next_token_loss` is the same computation written out: the reference
``tests/test_losses.py`` pins the model's loss against (so a transformers upgrade that changes it is caught), and a
fallback for backbones that only return logits.

Memory: the vocabulary is ~151k, so ask the model for the answer position only (``logits_to_keep=1`` in
transformers 5, correct with left padding where the last position is the answer position) before calling the
reranker losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmembed.backbone.pooling import last_token_pool

Reduction = Literal["mean", "sum", "none"]


def _reduce(values: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def answer_logits(logits: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Logits at the last real (non-padding) position of each sequence: the distribution of the next token.

    Works for left and right padding: the position is the last one whose attention mask is 1 (the same position
    :func:`mmembed.backbone.pooling.last_token_pool` reads for embeddings).

    Args:
        logits: (B, L, V) language-model logits.
        attention_mask: (B, L) 1 for real tokens; ``None`` means no padding (last position).

    Returns:
        (B, V) logits.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, L, V); got {tuple(logits.shape)}")
    if attention_mask is None:
        return logits[:, -1]
    return last_token_pool(logits, attention_mask, normalize=False)


def pointwise_rerank_loss(
    logits: Tensor,
    labels: Tensor,
    yes_token_id: int,
    no_token_id: int,
    *,
    full_vocab: bool = False,
    reduction: Reduction = "mean",
) -> Tensor:
    """Eq. 5: cross-entropy of the 'Yes' answer for relevant pairs and 'No' for irrelevant ones.

    Args:
        logits: (B, V) answer-position logits (see :func:`answer_logits`).
        labels: (B,) 1/True for a relevant (q, c+) pair, 0/False for (q, c-).
        yes_token_id: Vocabulary id of the 'Yes' answer token.
        no_token_id: Vocabulary id of the 'No' answer token.
        full_vocab: Cross-entropy over the whole vocabulary instead of over (No, Yes).
        reduction: 'mean', 'sum' or 'none' over pairs.

    Returns:
        The loss (scalar unless ``reduction='none'``).
    """
    labels = labels.to(device=logits.device).long()
    logits = logits.float()
    if full_vocab:
        target = torch.where(labels.bool(), yes_token_id, no_token_id)
        return _reduce(F.cross_entropy(logits, target, reduction="none"), reduction)
    two_way = logits[:, [no_token_id, yes_token_id]]  # class 1 = Yes
    return _reduce(F.cross_entropy(two_way, labels, reduction="none"), reduction)


def pointwise_scores(logits: Tensor, yes_token_id: int, no_token_id: int) -> Tensor:
    """Relevance score P(Yes) = softmax over the (No, Yes) logits; ranks candidates at inference (E+R mode)."""
    return torch.softmax(logits.float()[:, [no_token_id, yes_token_id]], dim=-1)[:, 1]


def listwise_rerank_loss(
    logits: Tensor,
    target: Tensor,
    index_token_ids: Sequence[int] | Tensor,
    *,
    num_candidates: Tensor | None = None,
    full_vocab: bool = False,
    reduction: Reduction = "mean",
) -> Tensor:
    """Eq. 6: cross-entropy of the positive's position index among the index tokens "1".."M+1".

    Args:
        logits: (B, V) answer-position logits.
        target: (B,) 0-based position of the positive in the list (the answer token is ``str(target + 1)``).
        index_token_ids: Token ids of "1", "2", ... up to the longest list in the batch.
        num_candidates: (B,) list length M + 1 per sample; index tokens beyond it are excluded from the softmax.
            ``None``: every sample uses all ``index_token_ids``.
        full_vocab: Cross-entropy over the whole vocabulary (``num_candidates`` is then ignored).
        reduction: 'mean', 'sum' or 'none' over samples.

    Returns:
        The loss.
    """
    ids = torch.as_tensor(index_token_ids, dtype=torch.long, device=logits.device)
    target = target.to(device=logits.device).long()
    limit = torch.full_like(target, len(ids)) if num_candidates is None else num_candidates.to(logits.device).long()
    if (target < 0).any() or (target >= limit).any() or (limit > len(ids)).any():
        raise ValueError("targets must lie in [0, num_candidates) and num_candidates <= len(index_token_ids)")
    logits = logits.float()
    if full_vocab:
        return _reduce(F.cross_entropy(logits, ids[target], reduction="none"), reduction)
    restricted = logits[:, ids]
    beyond = torch.arange(len(ids), device=logits.device)[None, :] >= limit[:, None]
    restricted = restricted.masked_fill(beyond, float("-inf"))
    return _reduce(F.cross_entropy(restricted, target, reduction="none"), reduction)


def next_token_loss(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    num_items: int | Tensor | None = None,
) -> Tensor:
    """Eq. 4 normalised per supervised token: shifted cross-entropy, masked where ``labels == ignore_index``.

    Args:
        logits: (B, L, V) logits; position t predicts token t + 1.
        labels: (B, L) token ids aligned with the input (not shifted); ``ignore_index`` for prompt and padding.
        ignore_index: Label value excluded from the loss.
        num_items: Divide the summed loss by this instead of by the local number of supervised tokens (e.g. the
            global count across ranks and accumulation steps).

    Returns:
        Scalar loss; 0 (with a graph) when no token is supervised.
    """
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    if num_items is None:
        num_items = (shift_labels != ignore_index).sum()
        if int(num_items) == 0:
            return total * 0.0
    return total / num_items
