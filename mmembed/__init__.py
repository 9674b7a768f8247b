"""mmembed: visual-token-efficient universal multimodal embeddings (Magic-MM-Embedding) on Lightning."""

from mmembed.types import Item

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
