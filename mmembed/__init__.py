"""mmembed: visual-token-efficient universal multimodal embeddings (Magic-MM-Embedding) on Lightning."""

from mmembed import _offline
from mmembed.types import Item

# Before anything imports peft/bitsandbytes: bitsandbytes would otherwise ask a model hub for a CPU kernel at import
# time on CPUs with AVX512-BF16 (see mmembed/_offline.py).
_offline.install()

__all__ = ["Embedder", "Item", "Reranker"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import mmembed` stays light (no transformers/torch import) for CLIs that only need data code.
    if name == "Embedder":
        from mmembed.embedder import Embedder

        return Embedder
    if name == "Reranker":
        from mmembed.reranker import Reranker

        return Reranker
    raise AttributeError(name)
