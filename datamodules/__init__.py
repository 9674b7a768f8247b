"""LightningDataModules over the kit's data: contrastive shards (stages 2-3) and instruction conversations (stage 1)."""

from datamodules.contrastive import ContrastiveCollate, ContrastiveDataModule, GroupByDataset
from datamodules.instruction import ConversationEncoder, InstructionCollate, InstructionDataModule

__all__ = [
    "ContrastiveCollate", "ContrastiveDataModule", "ConversationEncoder", "GroupByDataset", "InstructionCollate",
    "InstructionDataModule",
]
