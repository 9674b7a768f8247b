"""Zero hub lookups: keep bitsandbytes from asking a model hub for a CPU kernel while it is imported.

Why this exists: ``import peft`` imports bitsandbytes, and bitsandbytes' CPU backend
(``bitsandbytes/backends/cpu/ops.py``) runs, at import time, ``if has_avx512bf16(): from kernels import get_kernel;
get_kernel("kernels-community/quantization-bitsandbytes")`` -- a hub download (two DNS lookups of huggingface.co)
on every CPU whose native library reports AVX512-BF16. The decision is made by the compiled library
(``lib.has_avx512bf16_cpu()``), not by anything we can configure, and transformers 5 depends on ``kernels``, so the
package is always installed. bitsandbytes wraps the whole attempt in ``try/except Exception`` and falls back to its
own native CPU kernel (the path every CPU without ``kernels`` takes), so refusing the ``kernels`` import *during*
bitsandbytes' import gives the same results with no network.

How: :func:`install` puts a finder first on ``sys.meta_path`` that wraps only the top-level ``bitsandbytes`` module's
loader: while that module (and so its CPU backend) executes, ``sys.modules["kernels"]`` is ``None`` (an import of it
raises ``ImportError``); the previous entry is restored afterwards, so transformers' own, opt-in use of ``kernels`` is
untouched. ``HF_HUB_OFFLINE`` is not set, because it would change what a user's own code may download in the same
process. ``mmembed/__init__`` calls :func:`install`, so every path that imports mmembed before peft or bitsandbytes
(all the kit's entry points do) is covered; a process that imported bitsandbytes before mmembed has already made the
lookup, and :func:`install` cannot undo that.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

_GUARDED = "bitsandbytes"
_BLOCKED = "kernels"


class _WithoutKernels(importlib.abc.Loader):
    """Delegates to bitsandbytes' own loader, with ``kernels`` unimportable while the package executes."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        missing = object()
        saved = sys.modules.get(_BLOCKED, missing)
        sys.modules[_BLOCKED] = None  # type: ignore[assignment] -- None makes `import kernels` raise ImportError
        try:
            self._loader.exec_module(module)
        finally:
            if saved is missing:
                sys.modules.pop(_BLOCKED, None)
            else:
                sys.modules[_BLOCKED] = saved  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:  # resource readers, get_filename, ... of the real loader
        return getattr(self._loader, name)


class _GuardBitsandbytes(importlib.abc.MetaPathFinder):
    """Finds ``bitsandbytes`` the normal way and wraps its loader in :class:`_WithoutKernels`."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None):
        if fullname != _GUARDED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _WithoutKernels(spec.loader)
        return spec


def install() -> None:
    """Guard the next import of bitsandbytes (idempotent; a no-op once bitsandbytes is imported)."""
    if _GUARDED in sys.modules or any(isinstance(f, _GuardBitsandbytes) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _GuardBitsandbytes())
