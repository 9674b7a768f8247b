"""Offline, deterministic tokenizer and image-only processor for the random-init presets.

No hub is reachable, and no package ships a Qwen vocabulary, so presets get a small byte-level BPE trained on a
fixed built-in corpus with Qwen2's pre-tokenizer regex, wrapped in the stock ``Qwen2Tokenizer`` and carrying
InternVL3's special tokens (at their released ids for real-size presets) and the released InternVL3-*-hf chat
template, so a preset prompts exactly like a real checkpoint folder. The processor is the stock
``InternVLProcessor`` minus the video processor (which needs torchvision, not installable here); a real checkpoint
folder's tokenizer and image processor are loaded into the same class, so presets and real checkpoints share one
code path.
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

# InternVL3-*-hf special tokens with their released ids: Qwen2.5's own (151643-151664), then InternVL's (151665-151673)
# (STACK.md, from transformers' InternVL conversion script). `<video>` comes last (the stock processor requires it).
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
INTERNVL_SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
QWEN_FIRST_SPECIAL_ID = 151643  # `<|endoftext|>` in every Qwen2/Qwen2.5 vocabulary
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
MODEL_MAX_LENGTH = 8192  # the released tokenizers' model_max_length (CONTEXT_LENGTH in the conversion script)

# The chat template of the released InternVL3-*-hf checkpoints (transformers' InternVL conversion script; the same
# text ships in their tokenizer/processor): no system message; ChatML turns; an image part renders as the image
# placeholder on its own line. Presets carry it verbatim so a preset and a real folder give the same prompt.
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

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
    from mmembed.prompts.embedding import INSTRUCTIONS

    lines = [inst for _, q, t in INSTRUCTIONS.values() for inst in (q, t)]
    for c, s in itertools.product(_COLOURS, _SHAPES):
        lines.append(f"a {c} {s} on the left of a large {s} with a striped background")
        lines.append(f"How many {c} {s} are there? There are 3 {c} {s}.")
    lines.append(" ".join(_WORDS) + " 0123456789 , . ? ! : ; ( ) [ ] { } - _ / % $ # @ & * + = < > ' \"")
    lines.append("Instruct: Query: Text: Candidate: Candidates: (1) (2) (3) (4) (5) (6)")
    return lines * 4


def build_tokenizer(vocab_size: int = 2048, special_ids_from: int | None = None) -> Qwen2Tokenizer:
    """Train a deterministic byte-level BPE and wrap it as a stock ``Qwen2Tokenizer`` with InternVL's tokens.

    Args:
        vocab_size: Size of the learned vocabulary (special tokens come on top).
        special_ids_from: Id of the first special token. ``None``: right after the learned vocabulary (small
            presets). ``QWEN_FIRST_SPECIAL_ID`` (151643): the gap is filled with unreachable placeholder entries so
            every special token gets its released id (``<|im_end|>`` 151645, ``<IMG_CONTEXT>`` 151667, ...).

    Returns:
        A tokenizer that saves/reloads with ``AutoTokenizer``, carries the released InternVL3-*-hf chat template and
        ``model_max_length``, and exposes ``start_image_token``, ``end_image_token``, ``context_image_token`` and
        ``video_token`` (and their ``*_id``), as ``InternVLProcessor`` expects.
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
    vocab = dict(state["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    first = len(vocab) if special_ids_from is None else special_ids_from
    if first < len(vocab):
        raise ValueError(f"special_ids_from={first} is inside the learned vocabulary of {len(vocab)} entries")
    # Placeholder entries that no merge produces, so the special tokens land at their released ids without changing
    # how any text tokenizes.
    vocab.update({f"<|reserved_{i}|>": i for i in range(len(vocab), first)})
    specials = QWEN_SPECIALS + INTERNVL_SPECIALS + [NAMED_EXTRA_TOKENS["video_token"]]
    vocab.update({t: first + k for k, t in enumerate(specials)})
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        errors="replace",
        unk_token=None,
        bos_token=None,
        **SPECIAL_TOKENS,
        extra_special_tokens=dict(NAMED_EXTRA_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )
    others = [t for t in specials if t not in SPECIAL_TOKENS.values() and t not in NAMED_EXTRA_TOKENS.values()]
    tok.add_special_tokens({"additional_special_tokens": others}, replace_extra_special_tokens=False)
    got = tok.convert_tokens_to_ids(specials)
    if got != list(range(first, first + len(specials))):  # the tokenizers library re-numbered something
        raise RuntimeError(f"offline tokenizer: special tokens got ids {got}, expected {first}..")
    tok.chat_template = HF_CHAT_TEMPLATE
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


def build_image_processor(image_size: int, max_patches: int = 12) -> GotOcr2ImageProcessorPil:
    """InternVL's image processor (ImageNet mean/std, bicubic, dynamic tiling) at a given tile size.

    ``max_patches`` defaults to the released processors' 12; ``InputBuilder`` passes its ``TilePolicy`` caps per call.
    """
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
