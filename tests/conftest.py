"""Shared fixtures: tiny seeded backbones and generated images. No network, everything in tmp_path."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here; never phone home
torch.set_num_threads(2)


def make_image(w: int = 96, h: int = 96, color: str = "red", seed: int = 0) -> Image.Image:
    """A small deterministic scene: a coloured shape on a background."""
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    off = (seed * 7) % max(1, w // 4)
    d.ellipse([off, off, off + w // 2, off + h // 2], fill=color)
    return img


@pytest.fixture(scope="session")
def tiny_embedder():
    from mmembed import Embedder

    return Embedder.from_pretrained("tiny", vtc_factor=2, device="cpu")


@pytest.fixture
def images():
    return [make_image(color=c, seed=i) for i, c in enumerate(["red", "green", "blue"])]


@pytest.fixture(scope="session")
def kit_judge_tiny():
    """The kit's tiny preset as an MLLM judge (random init)."""
    from mmembed.judge import Judge

    return Judge.from_pretrained("tiny", device="cpu")
