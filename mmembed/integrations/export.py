"""Files an exported folder carries so the field's standard tools load it (written by ``Embedder.save_pretrained``).

- ``modules.json`` + ``config_sentence_transformers.json``: ``SentenceTransformer(folder, trust_remote_code=True)``
  builds :class:`mmembed.integrations.st.MMEmbedModule` (VTC, the paper's templates and last-token pooling are the
  kit's own code, which a stock ``Transformer`` module cannot express), with the instruction prompts as its named
  prompts. The flag is sentence-transformers' rule for any module class outside its own package.
- ``processing_mmembed.py`` + an ``auto_map`` entry: ``AutoProcessor.from_pretrained(folder, trust_remote_code=True)``
  builds an image-only ``InternVLProcessor``. The stock class also builds a video processor, which needs
  torchvision; torchvision has no wheel that works with the CPU torch build, so the kit does not depend on it. With
  torchvision installed, ``AutoProcessor.from_pretrained(folder)`` builds the stock class from the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

ST_MODULE_CLASS = "mmembed.integrations.st.MMEmbedModule"
PROCESSING_FILE = "processing_mmembed.py"
PROCESSOR_AUTO_MAP = "processing_mmembed.ImageOnlyInternVLProcessor"

# Self-contained on purpose (imports transformers only): transformers copies this file into its module cache and
# imports it there, so a user without mmembed installed gets the processor too.
PROCESSING_SOURCE = '''"""Image-only InternVLProcessor, written by mmembed's Embedder.save_pretrained.

The stock InternVLProcessor also builds a video processor, which requires torchvision. This subclass drops the
video part and is otherwise the stock class (placeholder expansion, GotOcr2 tiling). Load it with
AutoProcessor.from_pretrained(folder, trust_remote_code=True).
"""

from transformers import InternVLProcessor


class ImageOnlyInternVLProcessor(InternVLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kw):
        kw.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kw)
'''


def write_ecosystem_files(path: Path, prompts: dict[str, str]) -> None:
    """Add the sentence-transformers and AutoProcessor files to an exported folder (see the module docstring).

    Args:
        path: The folder ``save_pretrained`` is writing (its ``processor_config.json`` already written).
        prompts: Named instruction prompts, saved as sentence-transformers' ``prompts``.
    """
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_MODULE_CLASS}]
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    st_config = {
        "model_type": "SentenceTransformer",
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    (path / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
    (path / PROCESSING_FILE).write_text(PROCESSING_SOURCE)
    proc_file = path / "processor_config.json"
    proc = json.loads(proc_file.read_text())
    proc["auto_map"] = {"AutoProcessor": PROCESSOR_AUTO_MAP}
    proc_file.write_text(json.dumps(proc, indent=2))


def saved_prompts(path: Path) -> dict[str, str] | None:
    """The named prompts an exported folder carries (``config_sentence_transformers.json``), or ``None``."""
    file = Path(path) / "config_sentence_transformers.json"
    if not file.is_file():
        return None
    return json.loads(file.read_text()).get("prompts") or None
