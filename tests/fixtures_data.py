"""Helpers for the data-layer tests: tiny images, samples and source files written in the real formats."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmembed.data.schema import Sample, Side


def png_bytes(color=(200, 30, 30), size=(24, 24), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(color=(30, 200, 30), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming a huge size (a few bytes on disk): the decompression-bomb shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def text_sample(i: int, dataset: str = "toy_t2i", task: str = "t2i", negatives: int = 0) -> tuple[Sample, dict]:
    """A t2i sample with a PIL positive and ``negatives`` image negatives."""
    negs = [Side(image=f"neg{j}.png", instruction="Represent the given image.", id=f"{dataset}/n{i}_{j}")
            for j in range(negatives)]
    sample = Sample(
        id=f"{dataset}/{i:05d}",
        dataset=dataset,
        task=task,
        meta_task="retrieval",
        query=Side(text=f"caption number {i}", instruction="Find me an everyday image that matches the given query."),
        positive=Side(image="pos.png", instruction="Represent the given image.", id=f"{dataset}/p{i}"),
        negatives=negs,
        meta={"i": i},
    )
    images = {"pos.png": Image.new("RGB", (16, 16), (i * 20 % 256, 40, 90))}
    for j in range(negatives):
        images[f"neg{j}.png"] = Image.new("RGB", (16, 16), (10, i * 20 % 256, j * 50))
    return sample, images


def write_parquet(path: Path, columns: dict, schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_beir(folder: Path, hf_layout: bool = False, language: bool = False) -> Path:
    """A 3-page BEIR VisDoc set: q1 -> p1, q2 -> p2 (and p3 with score 0), q3 without qrels.

    Page p3 is stored as a path (``pages/p3.png``), the others as bytes, as HF ``datasets.Image`` structs.
    """
    (folder / "pages").mkdir(parents=True, exist_ok=True)
    (folder / "pages" / "p3.png").write_bytes(png_bytes((0, 0, 200), (40, 52)))
    corpus = {
        "corpus-id": ["p1", "p2", "p3"],
        "image": [
            {"bytes": png_bytes((200, 0, 0), (40, 52)), "path": "p1.png"},
            {"bytes": jpeg_bytes((0, 200, 0), (40, 52)), "path": None},
            {"bytes": None, "path": "pages/p3.png"},
        ],
    }
    queries = {"query-id": ["q1", "q2", "q3"], "query": ["red page?", "green page?", "nothing?"]}
    if language:
        queries["language"] = ["english", "french", "english"]
    qrels = {"query-id": ["q1", "q2", "q2"], "corpus-id": ["p1", "p2", "p3"], "score": [1, 2, 0]}

    def where(part: str) -> Path:
        return folder / part / "test-00000-of-00001.parquet" if hf_layout else folder / f"{part}.parquet"

    write_parquet(where("corpus"), corpus, pa.schema([("corpus-id", pa.string()), ("image", IMAGE_STRUCT)]))
    write_parquet(where("queries"), queries)
    write_parquet(where("qrels"), qrels)
    return folder
