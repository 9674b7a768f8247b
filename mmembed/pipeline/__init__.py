"""The paper's coarse-to-fine pipeline as a resumable stage graph (no Hydra here; the paper's stage table is
mmembed.launch.stages)."""

from mmembed.pipeline.graph import PAPER_STAGES, REGISTRY, Pipeline, StageDef, register_stage
from mmembed.pipeline.store import (
    COMPLETE,
    StageContext,
    StageResult,
    StageStore,
    fingerprint,
    read_complete,
    stage_key,
)

__all__ = ["COMPLETE", "PAPER_STAGES", "REGISTRY", "Pipeline", "StageContext", "StageDef", "StageResult",
           "StageStore", "fingerprint", "read_complete", "register_stage", "stage_key"]
