"""Last-token pooling (paper eq. 1) and the last-real-token index it rests on (also the reranker's answer position)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token; correct under left or right padding.

    Raises:
        ValueError: a row has no real token (attention mask all zeros).
    """
    if not bool(attention_mask.bool().any(dim=-1).all()):
        raise ValueError("a sequence has no real token (attention mask all zeros)")
    length = attention_mask.shape[1]
    # Index of the last 1 in each row: L - 1 - (position of the first 1 in the reversed row).
    return length - 1 - attention_mask.flip(-1).long().argmax(-1)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Hidden state of each row's last real token, L2-normalised; correct under left or right padding.

    Args:
        hidden: (B, L, D) final hidden states (or (B, L, V) logits: the reranker reads its answer this way).
        attention_mask: (B, L) with 1 for real tokens.
        normalize: L2-normalise the result.
    """
    last = last_token_index(attention_mask)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
    if not normalize:
        return pooled
    # Half-precision hidden states are normalised (and scored) in float32; wider dtypes are kept.
    return F.normalize(pooled.float() if pooled.dtype in (torch.float16, torch.bfloat16) else pooled, dim=-1)
