"""Offline, deterministic tokenizer and image-only processor for the random-init presets.

No hub is reachable, and no package ships a Qwen vocabulary, so presets get a small byte-level BPE trained on a
fixed built-in corpus with Qwen2's pre-tokenizer regex, wrapped in the stock ``Qwen2Tokenizer`` and carrying
InternVL's special tokens and ChatML chat template. The processor is the stock ``InternVLProcessor`` minus the
video processor (which needs torchvision, not installable here); a real checkpoint folder's tokenizer and image
processor are loaded into the same class, so presets and real checkpoints share one code path.
"""

from __future__ import annotations

import itertools
import json

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GotOcr2ImageProcessorPil, InternVLProcessor, Qwen2Tokenizer

# Qwen2's pre-tokenisation pattern (splits contractions, letters, single digits, punctuation, whitespace).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# InternVL3's special tokens, in the order the released tokenizer adds them after Qwen's own.
SPECIAL_TOKENS = {
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
}
NAMED_EXTRA_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
OTHER_SPECIALS = ["<|im_start|>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_SYSTEM = "You are a helpful multimodal assistant."

_COLOURS = "red green blue yellow purple orange black white gray grey pink brown cyan magenta".split()
_SHAPES = "circle circles square squares triangle triangles star stars hexagon diamond ellipse rectangle".split()
_WORDS = (
    "a an the of in on at to with and or is are there how many what which where who this that these those image "
    "images picture photo photograph scene document page table chart bar figure text caption query answer question "
    "left right top bottom center middle small medium large big tiny striped dotted solid plain background "
    "object objects shape shapes colour color count number one two three four five six seven eight nine ten "
    "find retrieve represent given everyday matches similar looks provided relevant based visual documents "
    "identify shown classification instruct candidate query yes no best meets requirements evaluate each "
    "select portion label cropped crop related information wikipedia news dialogue changes described style "
    "report revenue year quarter total percent profit growth market energy health government policy data value"
).split()


def _corpus() -> list[str]:
    """A fixed corpus covering English glue words, the templates and the synthetic world's vocabulary."""
    from mmembed.backbone.templates import INSTRUCTIONS

    lines = [inst for _, q, t in INSTRUCTIONS.values() for inst in (q, t)]
    for c, s in itertools.product(_COLOURS, _SHAPES):
        lines.append(f"a {c} {s} on the left of a large {s} with a striped background")
        lines.append(f"How many {c} {s} are there? There are 3 {c} {s}.")
    lines.append(" ".join(_WORDS) + " 0123456789 , . ? ! : ; ( ) [ ] { } - _ / % $ # @ & * + = < > ' \"")
    lines.append("Instruct: Query: Text: Candidate: Candidates: (1) (2) (3) (4) (5) (6)")
    return lines * 4


def build_tokenizer(vocab_size: int = 2048) -> Qwen2Tokenizer:
    """Train a deterministic byte-level BPE and wrap it as a stock ``Qwen2Tokenizer`` with InternVL's tokens.

    Args:
        vocab_size: Size of the learned vocabulary (special tokens come on top).

    Returns:
        A tokenizer that saves/reloads with ``AutoTokenizer`` and exposes ``start_image_token``,
        ``end_image_token``, ``context_image_token`` and ``video_token`` (and their ``*_id``), as
        ``InternVLProcessor`` expects.
    """
    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = state["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        errors="replace",
        unk_token=None,
        bos_token=None,
        **SPECIAL_TOKENS,
        extra_special_tokens=dict(NAMED_EXTRA_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"additional_special_tokens": OTHER_SPECIALS}, replace_extra_special_tokens=False)
    tok.chat_template = CHATML_TEMPLATE.replace("default_system", repr(DEFAULT_SYSTEM))
    return tok


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """The stock ``InternVLProcessor`` without its video processor.

    Why a subclass: the stock class requires a video processor, which needs torchvision; this kit handles images
    only. Everything else (placeholder expansion, tiling via ``GotOcr2ImageProcessorPil.crop_to_patches``, left
    padding) is the stock code.
    """

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kw):
        kw.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kw)


def build_image_processor(image_size: int, max_patches: int = 4) -> GotOcr2ImageProcessorPil:
    """InternVL's image processor (ImageNet mean/std, bicubic, dynamic tiling) at a given tile size."""
    return GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=False,
        min_patches=1,
        max_patches=max_patches,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )
