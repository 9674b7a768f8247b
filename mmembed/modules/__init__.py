"""Thin LightningModules over the shared VTC backbone."""

from mmembed.modules.base import BackboneModule
from mmembed.modules.contrastive import ContrastiveModule
from mmembed.modules.reranker import RerankerModule
from mmembed.modules.restoration import RestorationModule

__all__ = ["BackboneModule", "ContrastiveModule", "RerankerModule", "RestorationModule"]
