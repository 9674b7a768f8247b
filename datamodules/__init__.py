"""LightningDataModules over the kit's data: contrastive shards (stages 2-3) and instruction conversations (stage 1).

Installed as ``mmembed.datamodules`` (the repository folder ``datamodules/``; see setup.py).
"""

from mmembed.datamodules.contrastive import ContrastiveCollate, ContrastiveDataModule, GroupByDataset
from mmembed.datamodules.instruction import ConversationEncoder, InstructionCollate, InstructionDataModule

__all__ = [
    "ContrastiveCollate", "ContrastiveDataModule", "ConversationEncoder", "GroupByDataset", "InstructionCollate",
    "InstructionDataModule",
]
