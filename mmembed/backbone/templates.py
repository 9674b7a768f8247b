"""Moved to :mod:`mmembed.prompts` (prompt text is data that data, backbone and judge all read); re-exported here
for existing scripts."""

from mmembed.prompts.embedding import (  # noqa: F401
    INSTRUCTIONS,
    TEXT_LABELS,
    _norm,
    format_item_text,
    instructions_for,
    template_parts,
)
from mmembed.prompts.rerank import (  # noqa: F401
    LISTWISE_TEMPLATE,
    NO_ANSWER,
    POINTWISE_TEMPLATE,
    YES_ANSWER,
    format_listwise,
    format_pointwise,
    format_rerank_side,
)
