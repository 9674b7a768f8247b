"""The wire format of the embedding server: request validation and responses (pure Python, no server imports).

``POST /v1/embeddings`` takes the OpenAI embeddings request, extended for images and the paper's templates::

    {"model": "mmembed",                      # echoed back
     "input": "text" | ["text", ...] | [{"text": ..., "image": <base64 | data URL>, "instruction": ...,
                                          "kind": "natural" | "document"}, ...],
                                              # a string that is a data:image/...;base64, URL is an image
     "role": "query" | "candidate",           # which template (default "query")
     "instruction": "...",                    # default instruction for inputs without their own
     "encoding_format": "float" | "base64",   # base64 = little-endian float32, as OpenAI clients decode it
     "dimensions": D,                         # optional; 1..model dim: the first D coordinates, re-normalised
     "user": "..."}                           # accepted and ignored

and answers ``{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...]}], "model": ...,
"usage": {"prompt_tokens": n, "total_tokens": n}}``. Every rejected request gets a 4xx with an OpenAI-style body
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``; nothing a client sends reaches the
model before it has passed these checks.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from mmembed.types import Item

TOP_LEVEL = {"input", "model", "role", "instruction", "encoding_format", "dimensions", "user"}
ITEM_FIELDS = {"text", "image", "instruction", "kind"}
RERANK_FIELDS = {"query", "documents", "model", "top_n", "return_documents"}
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class Limits:
    """What one request may carry (the server's safety caps; all configurable on the command line).

    Attributes:
        max_request_bytes: Body size; larger bodies get 413 before they are read in full.
        max_inputs: Inputs per request (the OpenAI API allows 2048; images make ours heavier).
        max_image_pixels: Width x height per image, checked from the header before decoding (413 beyond).
        max_text_chars: Characters per text or instruction (the model cuts long texts to its token cap anyway).
        max_request_pixels: Pixels of all images of one request together, summed from their headers before any is
            decoded (413 beyond). A compressed body is small (32 PNGs of 4096x4096 fit in 0.7 MB) while each
            decoded pixel costs tens of bytes on its way through decoding, the worker queue and tiling.
        max_batch_pixels: Decoded pixels the server holds at once over all requests in flight (what one dynamic
            batch can carry); a request waits for room, so concurrent large requests take turns.
    """

    max_request_bytes: int = 16 * 2**20
    max_inputs: int = 64
    max_image_pixels: int = 4096 * 4096
    max_text_chars: int = 20_000
    max_request_pixels: int = 2 * 4096 * 4096
    max_batch_pixels: int = 2 * 4096 * 4096

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_inputs", "max_image_pixels", "max_text_chars", "max_request_pixels",
                     "max_batch_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_request_pixels > self.max_batch_pixels:
            raise ValueError(f"Limits.max_request_pixels ({self.max_request_pixels}) must not exceed "
                             f"max_batch_pixels ({self.max_batch_pixels}): such a request could never be served")


class RequestError(Exception):
    """A client error: HTTP status, message, the offending parameter and a short code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


@dataclass
class EmbeddingJob:
    """A validated embeddings request: Items ready to encode, plus how to answer."""

    items: list[Item]
    role: str = "query"
    model: str = "mmembed"
    encoding_format: str = "float"
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    dimensions: int | None = None


@dataclass
class RerankJob:
    """A validated rerank request: one query, the candidates to score, how many to return."""

    query: Item
    documents: list[Item]
    top_n: int | None = None
    return_documents: bool = False
    model: str = "mmembed-reranker"


def _check_fields(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r} in {where}; allowed: {', '.join(sorted(allowed))}",
                           param=unknown[0], code="unknown_field")


def _text(value: Any, param: str, limits: Limits) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(400, f"{param} must be a string, got {type(value).__name__}", param=param)
    if len(value) > limits.max_text_chars:
        raise RequestError(413, f"{param} has {len(value)} characters; the limit is {limits.max_text_chars}",
                           param=param, code="text_too_long")
    return value


def _image_bytes(value: Any, param: str) -> bytes:
    """The encoded file bytes of a base64 string or ``data:image/...;base64,`` URL (400 for anything else)."""
    if not isinstance(value, str):
        raise RequestError(400, f"{param} must be a base64 string or a data URL", param=param, code="bad_image")
    payload = _DATA_URL.sub("", value, count=1)
    if payload.startswith(("http://", "https://", "file:")):  # base64 itself may start with "/" (JPEG)
        raise RequestError(400, f"{param}: URLs and paths are not fetched; send the image bytes as base64",
                           param=param, code="bad_image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{param} is not valid base64 (send the file bytes base64-encoded, optionally as "
                                "a data:image/...;base64, URL)", param=param, code="bad_base64") from None


def _image_error(err: Any, param: str, limits: Limits) -> RequestError:
    """A :class:`~mmembed.data.skips.SkipSample` from the image decoder as the answer to send."""
    if err.reason == "decompression_bomb":
        return RequestError(413, f"{param} is too large ({err.detail}); the limit is {limits.max_image_pixels} "
                                 "pixels -- downscale it", param=param, code="image_too_large")
    return RequestError(400, f"{param} is not a readable image ({err.reason})", param=param, code="bad_image")


def decode_image(value: Any, param: str, limits: Limits) -> Image.Image:
    """A base64 string or ``data:image/...;base64,`` URL -> RGB image, within the pixel limit."""
    return _decode(_image_bytes(value, param), param, limits)


def _decode(data: bytes, param: str, limits: Limits) -> Image.Image:
    from mmembed.data.images import open_image
    from mmembed.data.skips import SkipSample

    try:
        return open_image(data, max_pixels=limits.max_image_pixels)
    except SkipSample as err:
        raise _image_error(err, param, limits) from None


def checked_image(value: Any, param: str, limits: Limits) -> bytes:
    """The encoded bytes of an image input, after decoding them once to prove they are a readable image.

    The job carries these bytes, not the decoded pixels: the worker decodes them with the same
    :func:`~mmembed.data.images.open_image` (so the same pixels), and the queue between the HTTP process and the
    worker moves kilobytes instead of ``3 x width x height`` bytes per image. The check's decoded copy lives only
    while this one image is checked.
    """
    data = _image_bytes(value, param)
    _decode(data, param, limits)
    return data


def image_pixels(value: Any, param: str, limits: Limits) -> int:
    """Width x height of an image input, read from its header only (no pixel is decoded).

    Not :func:`mmembed.data.images.image_size`: that one also reads the EXIF orientation, and for a PNG PIL's
    ``getexif()`` decodes the whole image to look for a late ``eXIf`` chunk. A pixel count does not depend on the
    orientation.
    """
    from mmembed.data.skips import SkipSample

    data = _image_bytes(value, param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                w, h = image.size
    except Image.DecompressionBombError as err:
        raise _image_error(SkipSample("decompression_bomb", str(err)), param, limits) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise _image_error(SkipSample("corrupt_image", repr(err)), param, limits) from None
    if w * h > limits.max_image_pixels:
        raise _image_error(SkipSample("decompression_bomb", f"{w}x{h} > {limits.max_image_pixels} pixels"), param,
                           limits)
    return w * h


def request_pixels(payload: Any, limits: Limits, rerank: bool = False) -> int:
    """Pixels of all images in an embeddings or rerank body, from their headers; 413 beyond ``max_request_pixels``.

    Runs before any image is decoded, so a request whose images would not fit costs header reads only. Malformed
    bodies count 0 here: the parsers answer them with the precise 400.
    """
    if not isinstance(payload, Mapping):
        return 0
    if rerank:
        docs = payload.get("documents")
        inputs = [("query", payload.get("query"))] + [(f"documents[{i}]", d) for i, d in
                                                      enumerate(docs if isinstance(docs, list) else [])]
    else:
        raw = payload.get("input")
        inputs = [(f"input[{i}]", v) for i, v in enumerate(raw if isinstance(raw, list) else [raw])]
    if len(inputs) > limits.max_inputs + 1:  # the parsers answer "too many inputs"; do not read their headers
        return 0
    total = 0
    for param, value in inputs:
        if isinstance(value, Mapping) and value.get("image") is not None:
            total += image_pixels(value["image"], f"{param}.image", limits)
    if total > limits.max_request_pixels:
        raise RequestError(413, f"the images of this request hold {total} pixels together; the limit is "
                                f"{limits.max_request_pixels} per request -- send fewer or smaller images per "
                                "request", param="input", code="images_too_large")
    return total


def parse_item(value: Any, param: str, limits: Limits, instruction: str | None = None) -> Item:
    """One input: a string (text) or an object with ``text``, ``image``, ``instruction``, ``kind``."""
    try:
        item = _item(value, param, limits, instruction)
    except ValueError as err:  # Item's own checks: invalid Unicode, an image token inside a text
        raise RequestError(400, f"{param}: {err}", param=param, code="bad_text") from None
    if item.is_empty:
        raise RequestError(400, f"{param} is empty: give it text or an image", param=param, code="empty_input")
    return item


def _item(value: Any, param: str, limits: Limits, instruction: str | None) -> Item:
    if isinstance(value, str) and _DATA_URL.match(value):
        # The typed OpenAI client sends strings only: an image data URL there is an image, not text to embed.
        item = Item(image=decode_image(value, param, limits), instruction=instruction)
    elif isinstance(value, str):
        item = Item(text=_text(value, param, limits), instruction=instruction)
    elif isinstance(value, Mapping):
        _check_fields(value, ITEM_FIELDS, param)
        kind = value.get("kind", "natural")
        if kind not in ("natural", "document"):
            raise RequestError(400, f"{param}.kind must be 'natural' or 'document', got {kind!r}",
                               param=f"{param}.kind")
        image = checked_image(value["image"], f"{param}.image", limits) if value.get("image") is not None else None
        own = _text(value.get("instruction"), f"{param}.instruction", limits)
        item = Item(text=_text(value.get("text"), f"{param}.text", limits), image=image,
                    instruction=own if own is not None else instruction, kind=kind)
    else:
        raise RequestError(400, f"{param} must be a string or an object with text/image/instruction/kind; token-id "
                                "inputs are not supported", param=param)
    return item


def _payload(payload: Any) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise RequestError(400, "the request body must be a JSON object")
    return payload


def parse_embedding_request(payload: Any, limits: Limits, embed_dim: int | None = None) -> EmbeddingJob:
    """Validate an embeddings request body (already JSON-decoded) into an :class:`EmbeddingJob`.

    Raises:
        RequestError: With the status and message to send back.
    """
    payload = _payload(payload)
    _check_fields(payload, TOP_LEVEL, "the request")
    if "input" not in payload:
        raise RequestError(400, "missing required field 'input'", param="input", code="empty_input")
    raw = payload["input"]
    inputs = raw if isinstance(raw, list) else [raw]
    if not inputs:
        raise RequestError(400, "'input' is an empty list", param="input", code="empty_input")
    if len(inputs) > limits.max_inputs:
        raise RequestError(413, f"{len(inputs)} inputs in one request; the limit is {limits.max_inputs} -- split it",
                           param="input", code="too_many_inputs")
    role = payload.get("role", "query")
    if role not in ("query", "candidate"):
        raise RequestError(400, f"role must be 'query' or 'candidate', got {role!r}", param="role")
    fmt = payload.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise RequestError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    dims = payload.get("dimensions")
    if dims is not None:
        upper = embed_dim if embed_dim is not None else dims
        if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= upper:
            raise RequestError(400, f"dimensions={dims!r}: give an integer from 1 to {upper} (the model's "
                                    "dimension); embeddings are cut to it and re-normalised", param="dimensions")
    model = payload.get("model", "mmembed")
    if not isinstance(model, str):
        raise RequestError(400, "model must be a string", param="model")
    instruction = _text(payload.get("instruction"), "instruction", limits)
    request_pixels(payload, limits)  # all headers first: nothing is decoded for a request beyond the pixel budget
    items = [parse_item(v, f"input[{i}]", limits, instruction) for i, v in enumerate(inputs)]
    return EmbeddingJob(items=items, role=role, model=model, encoding_format=fmt, dimensions=dims)


def parse_rerank_request(payload: Any, limits: Limits) -> RerankJob:
    """Validate a rerank request: ``{"query": input, "documents": [input, ...], "top_n": n}``."""
    payload = _payload(payload)
    _check_fields(payload, RERANK_FIELDS, "the request")
    if "query" not in payload:
        raise RequestError(400, "missing required field 'query'", param="query", code="empty_input")
    docs = payload.get("documents")
    if not isinstance(docs, list) or not docs:
        raise RequestError(400, "'documents' must be a non-empty list", param="documents", code="empty_input")
    if len(docs) > limits.max_inputs:
        raise RequestError(413, f"{len(docs)} documents; the limit is {limits.max_inputs}", param="documents",
                           code="too_many_inputs")
    top_n = payload.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or top_n < 1):
        raise RequestError(400, f"top_n must be a positive integer, got {top_n!r}", param="top_n")
    request_pixels(payload, limits, rerank=True)
    return RerankJob(query=parse_item(payload["query"], "query", limits),
                     documents=[parse_item(d, f"documents[{i}]", limits) for i, d in enumerate(docs)],
                     top_n=top_n, return_documents=bool(payload.get("return_documents", False)),
                     model=str(payload.get("model", "mmembed-reranker")))


def embedding_response(vectors: list[list[float]], model: str, tokens: int, encoding_format: str) -> dict[str, Any]:
    """The OpenAI embeddings response body."""
    data = []
    for i, vec in enumerate(vectors):
        emb: Any = vec
        if encoding_format == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def rerank_response(scores: list[float], job: RerankJob, texts: list[str | None]) -> dict[str, Any]:
    """A rerank response: documents sorted by score, best first (``index`` = position in the request)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: job.top_n or len(scores)]
    results = []
    for i in order:
        row: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if job.return_documents:
            row["document"] = {"text": texts[i]}
        results.append(row)
    return {"object": "list", "model": job.model, "results": results}
