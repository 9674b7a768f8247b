"""Moved to :mod:`mmembed.prompts.judge` (the judgment template and Table 13 are data that the synthetic world reads
too); re-exported here for existing scripts."""

from mmembed.prompts.judge import (  # noqa: F401
    BINARY_LABEL_DATASETS,
    JUDGE_HEAD,
    JUDGE_MIDDLE,
    JUDGE_TAIL,
    JUDGMENT_INSTRUCTIONS,
    TASK_FALLBACK,
    is_binary_label,
    judgment_body,
    judgment_instruction,
)
