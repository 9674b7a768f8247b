"""Matryoshka embeddings: the first ``d`` coordinates of an embedding, re-normalised, as a smaller embedding.

A model trained with the multi-dimension InfoNCE (``InfoNCELoss(matryoshka_dims=[...])``, Kusupati et al. 2022)
packs most of its retrieval signal into the leading coordinates, so cutting the vector to ``d`` dimensions and
re-normalising it keeps most of the quality at ``d / D`` of the storage. Any model can be truncated; only a
Matryoshka-trained one degrades gracefully. This module is the one place the truncation rule lives: the loss,
``Embedder.encode(truncate_dim=...)``, ``mmembed-index build --truncate-dim`` and the server's ``dimensions`` field
all call :func:`truncate_embeddings`. It imports only torch and numpy, so the index and the server stay light.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

Array = TypeVar("Array", torch.Tensor, np.ndarray)


def check_truncate_dim(dim: object, full_dim: int, what: str = "truncate_dim") -> int:
    """Validate a truncation dimension against the model's: an int in ``[1, full_dim]``.

    Raises:
        ValueError: naming the allowed range.
    """
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer):
        raise ValueError(f"{what} must be an integer in [1, {full_dim}], got {dim!r}")
    if not 1 <= int(dim) <= full_dim:
        raise ValueError(f"{what}={dim} is outside [1, {full_dim}]: this model makes {full_dim}-d embeddings")
    return int(dim)


def truncate_embeddings(x: Array, dim: int | None, *, normalize: bool = True) -> Array:
    """Keep the first ``dim`` coordinates of each row (last axis) and, with ``normalize``, L2-normalise them again.

    Args:
        x: (..., D) embeddings, a tensor or an array.
        dim: Target dimension in ``[1, D]``; ``None`` returns ``x`` unchanged.
        normalize: Re-normalise the truncated rows (cosine = inner product again).

    Returns:
        (..., dim) embeddings of the same type (float32 for arrays).
    """
    if dim is None:
        return x
    dim = check_truncate_dim(dim, int(x.shape[-1]))
    if isinstance(x, torch.Tensor):
        out = x[..., :dim]
        return F.normalize(out, dim=-1) if normalize else out
    out = np.asarray(x, dtype=np.float32)[..., :dim]
    if normalize:
        norm = np.linalg.norm(out, axis=-1, keepdims=True)
        out = out / np.maximum(norm, 1e-12)  # the same epsilon as F.normalize
    return np.ascontiguousarray(out, dtype=np.float32)
