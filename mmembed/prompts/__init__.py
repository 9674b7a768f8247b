"""Text the paper fixes, on the ground floor: data, backbone and judge read it, and it imports nothing of the kit.

* :mod:`~mmembed.prompts.embedding` -- the query / candidate templates of §3.1 and the task instructions of
  Tables 11-12 (:func:`instructions_for`);
* :mod:`~mmembed.prompts.judge` -- the judgment template of §3.3 and the judgment instructions of Table 13
  (:func:`judgment_instruction`);
* :mod:`~mmembed.prompts.rerank` -- the reranker's pointwise and listwise templates of §3.4.

``mmembed.backbone.templates`` and ``mmembed.judge.templates`` re-export these names for existing scripts.
"""

from mmembed.prompts.embedding import INSTRUCTIONS, format_item_text, instructions_for, template_parts
from mmembed.prompts.judge import BINARY_LABEL_DATASETS, JUDGMENT_INSTRUCTIONS, judgment_body, judgment_instruction
from mmembed.prompts.rerank import LISTWISE_TEMPLATE, POINTWISE_TEMPLATE, format_listwise, format_pointwise

__all__ = ["BINARY_LABEL_DATASETS", "INSTRUCTIONS", "JUDGMENT_INSTRUCTIONS", "LISTWISE_TEMPLATE", "POINTWISE_TEMPLATE",
           "format_item_text", "format_listwise", "format_pointwise", "instructions_for", "judgment_body",
           "judgment_instruction", "template_parts"]
