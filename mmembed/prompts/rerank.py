"""Reranker prompts (paper §3.4): the pointwise and listwise templates, word for word, and how a side is rendered."""

from __future__ import annotations

# The answer is generated right after the assistant turn opens.
POINTWISE_TEMPLATE = (
    "I will provide you with a query and a candidate. Please evaluate whether the candidate meets the requirements "
    "of the query. If it does, respond with 'Yes'; if it doesn't, respond with 'No'.\nQuery: {query}\n"
    "Candidate: {target}"
)
LISTWISE_TEMPLATE = (
    "I will provide you with a query followed by multiple candidates in the format: (1) cand1 (2) cand2, etc. Each "
    "candidate is independent of the others. Evaluate each candidate against the query, and respond with the number "
    "corresponding to the candidate that best meets the requirements of the query.\nQuery: {query}\n"
    "Candidates: {candidates}"
)
YES_ANSWER, NO_ANSWER = "Yes", "No"


def format_rerank_side(text: str | None, instruction: str | None, has_image: bool, image_token: str) -> str:
    """One query or candidate inside a reranker prompt: ``[instruction] [<image>] [text]``.

    Pass the query's instruction (it says what the task is, e.g. "Identify the scene shown in the image.") and no
    instruction for candidates: their instructions ("Represent the given image.") only steer the embedder.
    """
    return " ".join(p for p in (instruction, image_token if has_image else None, text) if p)


def format_pointwise(query: str, target: str) -> str:
    """The pointwise prompt body for rendered sides (see :func:`format_rerank_side`)."""
    return POINTWISE_TEMPLATE.format(query=query, target=target)


def format_listwise(query: str, candidates: list[str]) -> str:
    """The listwise prompt body: candidates numbered ``(1) ... (2) ...`` in list order."""
    numbered = " ".join(f"({i + 1}) {c}" for i, c in enumerate(candidates))
    return LISTWISE_TEMPLATE.format(query=query, candidates=numbered)
