"""The embedding server on LitServe: OpenAI-shaped ``/v1/embeddings``, dynamic batching, optional ``/v1/rerank``.

Two halves, as LitServe splits them:

* the **specs** (:class:`EmbeddingSpec`, :class:`RerankSpec`) run in the HTTP process: they read the body within the
  size limit, sum the pixels of its images from their headers (413 beyond the per-request budget), wait for room in
  the endpoint's :class:`PixelBudget` (decoded pixels in flight, which bounds a dynamic batch), validate it with
  :mod:`mmembed.serve.protocol` (decoding images under the pixel limits) and answer bad requests with a 4xx JSON
  error *there*. Only valid jobs reach the model worker -- which matters because LitServe
  fails a whole dynamic batch when one of its requests raises in the worker;
* the **APIs** (:class:`EmbeddingAPI`, :class:`RerankAPI`) run in the inference worker: ``setup`` loads the model once,
  ``predict`` takes the requests LitServe collected into a batch (up to ``max_batch_size`` within
  ``batch_timeout``), encodes all their inputs in one ``Embedder.encode`` call per role (length-sorted) and splits the
  result back per request.

The stock ``litserve.specs.OpenAIEmbeddingSpec`` is not used because it takes text only and refuses client-side
lists when dynamic batching is on; this spec follows its queue/response-buffer pattern.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import litserve as ls
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from mmembed.matryoshka import truncate_embeddings
from mmembed.serve.protocol import (
    EmbeddingJob,
    Limits,
    RequestError,
    RerankJob,
    embedding_response,
    parse_embedding_request,
    parse_rerank_request,
    request_pixels,
    rerank_response,
)

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")


# --------------------------------------------------------------------------------------------- HTTP-process half
class PixelBudget:
    """Decoded image pixels the server holds at once, over every request between decoding and its answer.

    Each request takes its pixels (summed from the image headers) before it decodes anything and gives them back
    once answered, so the images in the HTTP process, in the worker queue and in one dynamic batch never exceed
    ``capacity`` together, however many clients send large images at the same time. Shared by the endpoints of
    one server (they run in one event loop).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = capacity, 0
        self._cond: asyncio.Condition | None = None

    async def acquire(self, pixels: int, timeout: float) -> None:
        """Wait until ``pixels`` fit (``TimeoutError`` after ``timeout`` seconds)."""
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(lambda: self.used + pixels <= self.capacity), timeout)
            self.used += pixels

    async def release(self, pixels: int) -> None:
        assert self._cond is not None
        async with self._cond:
            self.used -= pixels
            self._cond.notify_all()


class _JSONSpec(LitSpec):
    """A POST endpoint that validates JSON in the HTTP process and queues only valid jobs for the worker."""

    path = "/"
    rerank = False  # which body shape request_pixels reads

    def __init__(self, limits: Limits, budget: PixelBudget | None = None, wait_timeout: float = 120.0) -> None:
        super().__init__()
        self.limits = limits
        self.api_path = self.path
        self.budget = budget or PixelBudget(limits.max_batch_pixels)
        self.wait_timeout = wait_timeout

    def pre_setup(self, lit_api: ls.LitAPI) -> None:
        self.api_path = self.path
        self.add_endpoint(self.path, self.endpoint, ["POST"])

    def decode_request(self, request, context_kwargs=None):  # the worker API decodes; kept for LitSpec
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    def parse(self, payload: Any) -> Any:
        raise NotImplementedError

    def respond(self, job: Any, output: Any) -> dict[str, Any]:
        raise NotImplementedError

    async def _read_json(self, request: Request) -> Any:
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body of {declared} bytes exceeds the {limit}-byte limit",
                               code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a body without Content-Length is capped too
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"request body exceeds the {limit}-byte limit", code="request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not valid JSON", code="bad_json") from None
        except RecursionError:  # e.g. 100k nested brackets: valid JSON, but no request of ours nests like that
            raise RequestError(400, "the request body nests too deeply", code="bad_json") from None

    async def endpoint(self, request: Request) -> JSONResponse:
        try:
            payload = await self._read_json(request)
            pixels = request_pixels(payload, self.limits, rerank=self.rerank)  # headers only: 413 before decoding
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        if pixels:
            try:
                await self.budget.acquire(pixels, self.wait_timeout)
            except TimeoutError:
                return JSONResponse(RequestError(503, f"the server is busy with other images; {pixels} pixels did "
                                                      f"not fit within {self.wait_timeout:.0f}s -- retry later",
                                                 code="server_busy").body(), status_code=503)
        try:
            return await self._answer(payload)
        finally:
            if pixels:
                await self.budget.release(pixels)

    async def _answer(self, payload: Any) -> JSONResponse:
        try:
            job = self.parse(payload)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        uid = uuid.uuid4()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event)
        self.request_queue.put_nowait((self.response_queue_id, uid, time.monotonic(), job))
        await event.wait()
        response, status = self.response_buffer.pop(uid).response
        if status == LitAPIStatus.ERROR:
            if isinstance(response, bytes):
                try:
                    response = pickle.loads(response)
                except Exception:  # noqa: BLE001 -- an undecodable error is still reported as a 500 below
                    pass
            if isinstance(response, HTTPException) and response.status_code < 500:
                return JSONResponse(RequestError(response.status_code, str(response.detail)).body(),
                                    status_code=response.status_code)
            log.error("inference failed: %r", response)
            code = 504 if isinstance(response, HTTPException) and response.status_code == 504 else 500
            return JSONResponse({"error": {"message": "the model failed on this request; see the server log",
                                           "type": "server_error", "param": None, "code": "internal"}},
                                status_code=code)
        return JSONResponse(self.respond(job, response))


class EmbeddingSpec(_JSONSpec):
    """``POST /v1/embeddings`` in the OpenAI shape (see :mod:`mmembed.serve.protocol`)."""

    path = "/v1/embeddings"

    def __init__(self, limits: Limits, embed_dim: int | None = None, budget: PixelBudget | None = None) -> None:
        super().__init__(limits, budget)
        self.embed_dim = embed_dim

    def parse(self, payload: Any) -> EmbeddingJob:
        return parse_embedding_request(payload, self.limits, self.embed_dim)

    def respond(self, job: EmbeddingJob, output: dict[str, Any]) -> dict[str, Any]:
        return embedding_response(output["embeddings"], job.model, output["tokens"], job.encoding_format)


class RerankSpec(_JSONSpec):
    """``POST /v1/rerank``: ``{"query": ..., "documents": [...], "top_n": n}`` -> documents by P("Yes")."""

    path = "/v1/rerank"
    rerank = True

    def parse(self, payload: Any) -> RerankJob:
        return parse_rerank_request(payload, self.limits)

    def respond(self, job: RerankJob, output: dict[str, Any]) -> dict[str, Any]:
        return rerank_response(output["scores"], job, [d.text for d in job.documents])


# ---------------------------------------------------------------------------------------------- worker half
class EmbeddingAPI(ls.LitAPI):
    """Loads an :class:`~mmembed.embedder.Embedder` in the worker and encodes batches of validated jobs.

    Args:
        model: Preset name or local model folder.
        limits: Request limits (enforced by the spec).
        max_batch_size: Requests LitServe may group into one ``predict`` call (dynamic batching; 1 = off).
        batch_timeout: Seconds LitServe waits to fill a batch.
        encode_batch_size: Items per forward pass inside ``Embedder.encode``.
        precision: ``Embedder.encode`` compute precision (``float32`` / ``bfloat16`` / ``float16``).
        threads: torch intra-op threads in the worker (CPU).
        embedder_kwargs: Passed to ``Embedder.from_pretrained`` (``vtc_factor``, ``dtype``, ...).
    """

    def __init__(self, model: str, *, limits: Limits = Limits(), max_batch_size: int = 8,
                 batch_timeout: float = 0.01, encode_batch_size: int = 16, precision: str | None = None,
                 threads: int | None = None, embed_dim: int | None = None, **embedder_kwargs: Any) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                         spec=EmbeddingSpec(limits, embed_dim))
        self.model, self.encode_batch_size, self.precision = model, encode_batch_size, precision
        self.threads, self.embedder_kwargs = threads, embedder_kwargs

    def setup(self, device: str) -> None:
        import torch

        from mmembed.embedder import Embedder

        if self.threads:
            torch.set_num_threads(self.threads)
        self.embedder = Embedder.from_pretrained(self.model, device=device, **self.embedder_kwargs)

    def decode_request(self, request: EmbeddingJob, **kwargs: Any) -> EmbeddingJob:
        return request  # validated and decoded by EmbeddingSpec in the HTTP process

    def batch(self, inputs: list[EmbeddingJob]) -> list[EmbeddingJob]:
        return list(inputs)

    def predict(self, x: EmbeddingJob | list[EmbeddingJob], **kwargs: Any) -> Any:
        jobs = x if isinstance(x, list) else [x]
        log.debug("predict: %d requests, %d inputs", len(jobs), sum(len(j.items) for j in jobs))
        outputs = self.encode_jobs(jobs)
        return outputs if isinstance(x, list) else outputs[0]

    def encode_jobs(self, jobs: list[EmbeddingJob]) -> list[dict[str, Any]]:
        """All inputs of all jobs in one ``encode`` call per role, split back per job."""
        out: list[dict[str, Any]] = [{} for _ in jobs]
        for role in ("query", "candidate"):
            idx = [j for j, job in enumerate(jobs) if job.role == role]
            if not idx:
                continue
            items = [it for j in idx for it in jobs[j].items]
            vecs = self.embedder.encode(items, role=role, batch_size=self.encode_batch_size,
                                        precision=self.precision, convert_to_numpy=True, show_progress_bar=False)
            lengths = self.embedder.input_builder.num_tokens(items, role)
            start = 0
            for j in idx:
                n = len(jobs[j].items)
                # Matryoshka: each request's own "dimensions" (the batch may mix them), cut after encoding.
                part = truncate_embeddings(vecs[start : start + n], jobs[j].dimensions)
                out[j] = {"embeddings": part.tolist(), "tokens": int(sum(lengths[start:start + n]))}
                start += n
        return out

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return output


class RerankAPI(ls.LitAPI):
    """Scores documents against a query with ``mmembed.reranker.Reranker`` (pointwise P("Yes"))."""

    def __init__(self, reranker: str, *, limits: Limits = Limits(), threads: int | None = None) -> None:
        super().__init__(max_batch_size=1, spec=RerankSpec(limits))
        self.reranker_path, self.threads = reranker, threads

    def setup(self, device: str) -> None:
        import inspect

        import torch

        Reranker = load_reranker_class()
        if self.threads:
            torch.set_num_threads(self.threads)
        kwargs = {"device": device} if "device" in inspect.signature(Reranker.from_pretrained).parameters else {}
        self.reranker = Reranker.from_pretrained(self.reranker_path, **kwargs)

    def decode_request(self, request: RerankJob, **kwargs: Any) -> RerankJob:
        return request

    def predict(self, job: RerankJob, **kwargs: Any) -> dict[str, Any]:
        return {"scores": [float(s) for s in self.reranker.score(job.query, job.documents)]}

    def encode_response(self, output: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return output


def load_reranker_class() -> Callable:
    """``mmembed.reranker.Reranker``, or an ImportError saying the install lacks it."""
    try:
        from mmembed.reranker import Reranker
    except ImportError as err:
        raise ImportError("--reranker needs mmembed.reranker.Reranker, which this install does not have; update "
                          "mmembed or serve without --reranker") from err
    return Reranker


# ---------------------------------------------------------------------------------------------------- assembly
def build_server(model: str, *, limits: Limits = Limits(), max_batch_size: int = 8, batch_timeout: float = 0.01,
                 encode_batch_size: int = 16, precision: str | None = None, device: str = "auto",
                 reranker: str | None = None, timeout: float = 120.0, threads: int | None = None,
                 **embedder_kwargs: Any) -> ls.LitServer:
    """A ready-to-run ``LitServer`` with ``/v1/embeddings``, ``/health`` and, given ``reranker``, ``/v1/rerank``.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
        timeout: Seconds a request may wait in the queue before a 504.
        Other arguments: see :class:`EmbeddingAPI` and :class:`~mmembed.serve.protocol.Limits`.
    """
    from mmembed.backbone.model import load_config

    if max_batch_size < 1 or batch_timeout < 0 or encode_batch_size < 1:
        raise ValueError("max_batch_size and encode_batch_size must be >= 1 and batch_timeout >= 0")
    embed_dim = load_config(model).text_config.hidden_size  # fails early on a bad model name, before any worker
    if device == "cuda":
        from mmembed.cli_args import check_device

        check_device(device)
    apis: list[ls.LitAPI] = [EmbeddingAPI(model, limits=limits, max_batch_size=max_batch_size,
                                          batch_timeout=batch_timeout, encode_batch_size=encode_batch_size,
                                          precision=precision, threads=threads, embed_dim=embed_dim,
                                          **embedder_kwargs)]
    if reranker is not None:
        load_reranker_class()  # fail now, not in the worker
        load_config(reranker)  # a missing / wrong folder too: in the worker it ends as a multi-process traceback
        apis.append(RerankAPI(reranker, limits=limits, threads=threads))
    accelerator = device if device in ("cpu", "cuda") else "auto"
    return ls.LitServer(apis, accelerator=accelerator, devices=1, timeout=timeout,
                        model_metadata={"model": model, "embed_dim": embed_dim})


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          **kwargs: Any) -> None:
    """Build and run the server (blocks). Binds loopback unless ``host`` says otherwise."""
    if host not in LOOPBACK:
        log.warning("binding %s: the server has no authentication; put it behind a proxy that has", host)
    server = build_server(model, **kwargs)
    main_pid = os.getpid()

    def _stop(signum, frame):
        # SIGTERM -> the graceful path LitServe takes on Ctrl-C (it stops its workers too). The HTTP and model
        # workers are forked and inherit this handler; uvicorn re-raises the SIGTERM it caught after its own clean
        # shutdown, so in a worker a quiet exit is right (a KeyboardInterrupt there printed a traceback).
        if os.getpid() != main_pid:
            raise SystemExit(0)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    shown = "127.0.0.1" if host == "localhost" else host
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
    print(f"mmembed-serve: {model} ({server.model_metadata['embed_dim']}-d embeddings) on {url} -- POST "
          f"{url}/v1/embeddings, GET {url}/health (ready once the model has loaded); SIGTERM or Ctrl-C stops it",
          file=sys.stderr, flush=True)
    server.run(host="127.0.0.1" if host == "localhost" else host, port=port, generate_client_file=False,
               num_api_servers=1, log_level=log_level)
