"""Last-token pooling (paper eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Hidden state of each row's last real token, L2-normalised; correct under left or right padding.

    Args:
        hidden: (B, L, D) final hidden states.
        attention_mask: (B, L) with 1 for real tokens.
        normalize: L2-normalise the result.
    """
    length = attention_mask.shape[1]
    # Index of the last 1 in each row: L - 1 - (position of the first 1 in the reversed row).
    last = length - 1 - attention_mask.flip(-1).long().argmax(-1)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if not normalize:
        return pooled
    # Half-precision hidden states are normalised (and scored) in float32; wider dtypes are kept.
    return F.normalize(pooled.float() if pooled.dtype in (torch.float16, torch.bfloat16) else pooled, dim=-1)
