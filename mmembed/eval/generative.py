"""Does stage 1 restore generation? Greedy-decoded answers on held-out synthetic VQA, exact match (paper §3.3).

The paper measures restoration indirectly (the embedder trained on top of it is better); this is the direct check
on the synthetic world: one question per held-out scene ("How many squares are there?", "Where is the red dotted
star?", "What is the background color of the image?"), answered by the model's own greedy decoding, scored by exact
match after lower-casing and stripping punctuation at the ends.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from rich.progress import track


@dataclass(frozen=True)
class VQAExample:
    """One held-out question about one image, with its reference answer."""

    image: Image.Image
    question: str
    answer: str


def heldout_vqa(n: int = 64, seed: int = 0, side: int = 256) -> list[VQAExample]:
    """``n`` VQA questions on scenes drawn from their own random stream (never the training conversations').

    Training conversations come from ``Random(f"{seed}/instruct/llava")``; these from
    ``Random(f"{seed}/heldout/vqa")``, so the two sets share templates but not scenes.
    """
    from mmembed.data.synth.instruct import make_conversation

    rng = random.Random(f"{seed}/heldout/vqa")
    out = []
    for _ in range(n):
        image, conv = make_conversation(rng, "vqa", side)
        question = conv[0]["value"].replace("<image>\n", "", 1)
        out.append(VQAExample(image=image, question=question, answer=conv[1]["value"]))
    return out


def normalize_answer(text: str) -> str:
    """Lower-case, collapse spaces, strip surrounding punctuation: ``" Three."`` -> ``"three"``."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, processor: Any, examples: list[VQAExample], max_tiles: int = 1,
                   max_new_tokens: int = 16, show_progress: bool = False) -> list[str]:
    """Greedy-decode one answer per example with the chat template's generation prompt.

    Args:
        model: An ``InternVLForConditionalGeneration`` with VTC applied (``VTCBackbone.hf_model``); peft-wrapped
            models work too (their base model generates with the adapters active).
        processor: The image-only InternVL processor matching the model's compression (``load_processor``).
        examples: Questions and images.
        max_tiles: Tile cap (1: the image alone, as the synthetic scenes are square).
        max_new_tokens: Generation budget per answer.
        show_progress: Show a progress bar.
    """
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else end
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    try:
        for ex in track(examples, description="greedy VQA") if show_progress else examples:
            messages = [{"role": "user", "content": f"{processor.image_token}\n{ex.question}"}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = processor(text=[text], images=[ex.image], return_tensors="pt", crop_to_patches=max_tiles > 1,
                               max_patches=max_tiles, min_patches=1).to(device)
            inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=end,
                                 pad_token_id=pad)
            answers.append(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


def vqa_exact_match(model: torch.nn.Module, processor: Any, examples: list[VQAExample], **kwargs: Any) -> float:
    """Percentage of examples whose greedy answer equals the reference after :func:`normalize_answer`."""
    if not examples:
        raise ValueError("no examples to evaluate; pass n >= 1 to heldout_vqa")
    answers = greedy_answers(model, processor, examples, **kwargs)
    hits = sum(normalize_answer(a) == normalize_answer(ex.answer) for a, ex in zip(answers, examples))
    return 100.0 * hits / len(examples)
