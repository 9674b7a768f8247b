"""Tamper evidence for saved indexes: checksums and counts written at build, checked at load; the model at search.

A saved index is three files that must stay in step (``vectors.npy`` row i, ``meta.jsonl`` line i and the
approximate structure in ``index.faiss`` all describe item i). Reordering ``meta.jsonl``, swapping in another index's
``index.faiss`` or flipping bytes in ``vectors.npy`` would still search -- and return wrong ids without a sign. So
``Index.save`` records a SHA-256 of every file in ``index.json`` and ``Index.load`` refuses a folder whose files do not
match, before parsing them; files that do not parse (a bad ``.npy`` header, a truncated ``index.faiss``) become the
same kind of one-line ``ValueError``. Non-finite vectors are refused at build and at load, and
:func:`check_model` compares the fingerprint of the model about to encode queries with the one that built the index.

The checksums detect accidents and mix-ups (a file copied from another build, a partial copy, bit rot, an edit); they
are not a signature: whoever can rewrite ``index.json`` can rewrite its checksums too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

_REBUILD = "rebuild the index (mmembed-index build ...)"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in blocks (a memory-mapped vectors file is never loaded whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def checksums(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """``{file name: sha256}`` of these files in ``folder`` (as written by ``Index.save``)."""
    return {name: sha256_file(folder / name) for name in names}


def verify_checksums(folder: Path, recorded: dict[str, str] | None) -> None:
    """Raise a one-line ``ValueError`` if a file differs from (or lacks) the checksum recorded at build.

    An index saved before checksums were recorded (``recorded`` is None) is accepted unchecked.
    """
    if recorded is None:
        return
    for name, digest in sorted(recorded.items()):
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path} is missing (index.json records it); the folder is incomplete -- {_REBUILD}")
        if sha256_file(path) != digest:
            raise ValueError(f"{path} does not match the checksum recorded when the index was built (edited, "
                             f"reordered, truncated or copied from another index?); {_REBUILD}")


def parsed(path: Path, read: Callable[[], T], what: str) -> T:
    """``read()``, with any failure to parse ``path`` turned into a one-line ``ValueError``."""
    try:
        return read()
    except (FileNotFoundError, ImportError):
        raise
    except Exception as err:  # noqa: BLE001 -- numpy, json and faiss raise many types for a damaged file
        text = str(err).strip().splitlines()
        raise ValueError(f"{path} is not a readable {what} ({type(err).__name__}: {text[0] if text else ''}); "
                         f"{_REBUILD}") from None


def check_finite(vectors: Any, where: str, block: int = 65536) -> None:
    """Refuse NaN / inf rows (they would score as nothing or everything); ``vectors`` may be memory-mapped."""
    for start in range(0, len(vectors), block):
        part = np.asarray(vectors[start : start + block])
        bad = ~np.isfinite(part).all(axis=1)
        if bad.any():
            rows = (np.flatnonzero(bad) + start)[:5].tolist()
            raise ValueError(f"{where}: {int(bad.sum())} vector(s) hold NaN or inf (rows {rows}...); the model "
                             "produced invalid embeddings or the file is damaged -- fix the model and rebuild")


def check_model(index: Any, embedder: Any) -> None:
    """Refuse to search ``index`` with query embeddings from another model than the one that built it.

    Compares :func:`mmembed.embedder.model_fingerprint` (a hash of a few values of every parameter) with
    the fingerprint ``index.json`` recorded; an index without one, or an embedder without a torch module, passes.
    """
    from mmembed.embedder import model_fingerprint

    made_by, ours = index.info.get("model_fingerprint"), model_fingerprint(embedder)
    if made_by and ours and made_by != ours:
        raise ValueError(f"this index was built by another model (fingerprint {made_by[:12]}, this model "
                         f"{ours[:12]}): its vectors and these queries are not comparable; search with the model "
                         f"that built it ({index.info.get('model') or 'see index.json'}) or rebuild the index")
