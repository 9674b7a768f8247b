"""MLLM-as-a-judge (paper §3.3 Stage 3): judgment template + Table 13, yes/no logits, retrieve-and-curate; the
simulated expert judge (synthetic world only) and the margin control."""

from mmembed.judge.curate import CurationSummary, curate
from mmembed.judge.judge import Judge, JudgePair, JudgeScores, answer_token_ids, image_only_processor_class
from mmembed.judge.simulated import SIMULATED, SIMULATED_LABEL, SimulatedJudge, judge_label, load_judge
from mmembed.prompts.judge import BINARY_LABEL_DATASETS, JUDGMENT_INSTRUCTIONS, judgment_instruction

__all__ = ["BINARY_LABEL_DATASETS", "JUDGMENT_INSTRUCTIONS", "SIMULATED", "SIMULATED_LABEL", "CurationSummary",
           "Judge", "JudgePair", "JudgeScores", "SimulatedJudge", "answer_token_ids", "curate",
           "image_only_processor_class", "judge_label", "judgment_instruction", "load_judge"]
