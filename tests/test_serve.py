"""The embedding server: request validation, the worker's batched encoding, and the real server over HTTP."""

from __future__ import annotations

import base64
import io
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mmembed import Item
from mmembed.data.images import open_image
from mmembed.serve.protocol import (
    EmbeddingJob,
    Limits,
    RequestError,
    embedding_response,
    parse_embedding_request,
    parse_rerank_request,
    rerank_response,
)

from .conftest import make_image
from .fixtures_data import bomb_png

INST = "Find me an everyday image that matches the given query."


def _b64(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _error(payload, limits: Limits = Limits(), embed_dim: int | None = 64) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_embedding_request(payload, limits, embed_dim)
    return info.value


def test_parse_valid_requests_into_items():
    img = make_image(40, 30, "green")
    job = parse_embedding_request({
        "model": "m", "role": "candidate", "instruction": INST, "encoding_format": "base64", "user": "u",
        "input": ["plain text", {"image": _b64(img), "text": "a caption", "instruction": "own"},
                  {"image": "data:image/jpeg;base64," + _b64(img, "JPEG"), "kind": "document"}]},
        Limits(), embed_dim=64)
    assert job.role == "candidate" and job.model == "m" and job.encoding_format == "base64"
    a, b, c = job.items
    assert a == Item(text="plain text", instruction=INST)
    # images travel to the worker as their checked, encoded bytes; the worker decodes them with the one decoder
    assert isinstance(b.image, bytes) and isinstance(c.image, bytes)
    assert b.text == "a caption" and b.instruction == "own" and open_image(b.image).size == (40, 30)
    assert np.array_equal(np.asarray(open_image(b.image)), np.asarray(img))  # PNG is lossless: the very pixels sent
    assert c.kind == "document" and c.instruction == INST and open_image(c.image).mode == "RGB"
    single = parse_embedding_request({"input": "just one"}, Limits())
    assert single.role == "query" and single.items == [Item(text="just one")]


@pytest.mark.parametrize(("payload", "status", "code", "message"), [
    ({"input": "x", "temperature": 1}, 400, "unknown_field", "unknown field 'temperature' in the request"),
    ({"input": [{"text": "x", "url": "u"}]}, 400, "unknown_field", "unknown field 'url' in input[0]"),
    ({"input": []}, 400, "empty_input", "'input' is an empty list"),
    ({"model": "m"}, 400, "empty_input", "missing required field 'input'"),
    ({"input": ["ok", "  "]}, 400, "empty_input", "input[1] is empty"),
    ({"input": [{"instruction": "only"}]}, 400, "empty_input", "input[0] is empty"),
    ({"input": [{"image": "@@not base64@@"}]}, 400, "bad_base64", "input[0].image is not valid base64"),
    ({"input": [{"image": base64.b64encode(b"plain bytes").decode()}]}, 400, "bad_image", "not a readable image"),
    ({"input": [{"image": "https://example.com/a.png"}]}, 400, "bad_image", "URLs and paths are not fetched"),
    ({"input": [{"image": base64.b64encode(bomb_png(5000, 5000)).decode()}]}, 413, "image_too_large",
     "input[0].image is too large"),
    ({"input": ["x"] * 65}, 413, "too_many_inputs", "65 inputs in one request; the limit is 64"),
    ({"input": [[1, 2, 3]]}, 400, "invalid_request", "token-id inputs are not supported"),
    ({"input": "x", "role": "document"}, 400, "invalid_request", "role must be 'query' or 'candidate'"),
    ({"input": "x", "encoding_format": "int8"}, 400, "invalid_request", "encoding_format must be"),
    ({"input": "x", "dimensions": 65}, 400, "invalid_request", "dimensions=65: give an integer from 1 to 64"),
    ({"input": "x" * 20_001}, 413, "text_too_long", "input[0] has 20001 characters"),
    (["not", "an", "object"], 400, "invalid_request", "must be a JSON object"),
])
def test_bad_requests_get_4xx_with_a_clear_message(payload, status, code, message):
    err = _error(payload)
    assert (err.status, err.code) == (status, code) and message in err.message
    body = err.body()["error"]
    assert body["type"] == "invalid_request_error" and body["message"] == err.message


def test_responses_in_openai_shape():
    vecs = [[0.5, -0.25, 1.0], [0.0, 1.0, 2.0]]
    body = embedding_response(vecs, "m", 7, "float")
    assert body["object"] == "list" and body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][1]["embedding"] == vecs[1]
    packed = embedding_response(vecs, "m", 7, "base64")["data"][0]["embedding"]
    assert list(struct.unpack("<3f", base64.b64decode(packed))) == vecs[0]
    job = parse_rerank_request({"query": "q", "documents": ["a", {"text": "b"}, "c"], "top_n": 2,
                                "return_documents": True}, Limits())
    out = rerank_response([0.1, 0.9, 0.5], job, [d.text for d in job.documents])
    assert out["results"] == [{"index": 1, "relevance_score": 0.9, "document": {"text": "b"}},
                              {"index": 2, "relevance_score": 0.5, "document": {"text": "c"}}]
    with pytest.raises(RequestError, match="'documents' must be a non-empty list"):
        parse_rerank_request({"query": "q", "documents": []}, Limits())


def test_worker_encodes_a_dynamic_batch_like_embedder_encode(tiny_embedder, images):
    pytest.importorskip("litserve")
    from mmembed.serve.server import EmbeddingAPI

    api = EmbeddingAPI("tiny", max_batch_size=4)
    api.embedder = tiny_embedder  # what setup() loads, without building the model again
    jobs = [EmbeddingJob([Item(text="a red circle", instruction=INST), Item(image=images[0])], role="query"),
            EmbeddingJob([Item(text="two squares")], role="candidate"),
            EmbeddingJob([Item(image=images[1], kind="document", text="page")], role="query")]
    out = api.unbatch(api.predict(api.batch([api.decode_request(j) for j in jobs])))
    assert len(out) == 3
    for job, res in zip(jobs, out):
        ref = tiny_embedder.encode(job.items, role=job.role)
        assert np.abs(np.asarray(res["embeddings"]) - ref.numpy()).max() < 1e-5
        assert res["tokens"] == sum(tiny_embedder.input_builder.num_tokens(job.items, job.role))
    assert api.predict(jobs[1])["embeddings"] == out[1]["embeddings"]  # max_batch_size=1 calls predict unbatched


def test_rerank_option_is_guarded():
    pytest.importorskip("litserve")
    from mmembed.serve.server import build_server, load_reranker_class

    try:
        import mmembed.reranker  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs mmembed.reranker.Reranker"):
            load_reranker_class()
        with pytest.raises(ImportError, match="serve without --reranker"):
            build_server("tiny", reranker="some/folder")
    else:
        assert callable(load_reranker_class().score)


def _png_b64(side: int) -> str:
    return _b64(make_image(side, side, "red"))


def test_the_request_pixel_budget_is_checked_from_headers_before_any_decoding(monkeypatch):
    from mmembed.data import images
    from mmembed.serve import protocol

    # the flood: 32 PNGs of 4096x4096 (each within the per-image limit) in one small body
    big = base64.b64encode(bomb_png(4096, 4096)).decode()
    decoded = []
    monkeypatch.setattr(images, "open_image", lambda *a, **k: decoded.append(1))
    err = _error({"input": [{"image": big} for _ in range(32)]})
    assert (err.status, err.code) == (413, "images_too_large") and "the limit is 33554432 per request" in err.message
    assert decoded == []  # refused from the headers alone
    with pytest.raises(RequestError, match="images of this request hold"):
        parse_rerank_request({"query": {"image": big}, "documents": [{"image": big}] * 2}, Limits())
    assert protocol.request_pixels({"query": {"image": big}, "documents": [{"image": big}]}, Limits(),
                                   rerank=True) == 2 * 4096 * 4096
    assert decoded == []
    # a real, compressible 4096x4096 PNG: its pixels are not decoded either (PIL's PNG getexif() would decode them)
    from PIL import Image, ImageFile

    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (200, 30, 30)).save(buf, format="PNG")
    real = base64.b64encode(buf.getvalue()).decode()
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append("load"))
    assert _error({"input": [{"image": real} for _ in range(32)]}).code == "images_too_large"
    assert decoded == []
    monkeypatch.undo()
    small = Limits(max_image_pixels=64 * 64, max_request_pixels=2 * 64 * 64, max_batch_pixels=2 * 64 * 64)
    assert protocol.request_pixels({"input": [{"image": _png_b64(64)}, "text", {"image": _png_b64(32)}]},
                                   small) == 64 * 64 + 32 * 32
    assert len(parse_embedding_request({"input": [{"image": _png_b64(64)}] * 2}, small).items) == 2
    err = _error({"input": [{"image": _png_b64(64)}] * 3}, small)
    assert (err.status, err.code) == (413, "images_too_large")
    with pytest.raises(ValueError, match="must not exceed max_batch_pixels"):
        Limits(max_request_pixels=10, max_batch_pixels=5)


def test_pixel_budget_makes_concurrent_requests_take_turns():
    import asyncio

    from mmembed.serve.server import PixelBudget

    async def scenario():
        budget, order = PixelBudget(10), []

        async def request(name, pixels, hold):
            await budget.acquire(pixels, timeout=5)
            order.append(f"+{name}")
            await asyncio.sleep(hold)
            order.append(f"-{name}")
            await budget.release(pixels)

        await asyncio.gather(request("a", 6, 0.05), request("b", 6, 0.0), request("c", 4, 0.0))
        assert budget.used == 0
        await budget.acquire(10, timeout=1)
        with pytest.raises(TimeoutError):
            await budget.acquire(1, timeout=0.05)
        return order

    order = asyncio.run(scenario())
    # a and c fit together (6 + 4); b waits until a is done
    assert order.index("+b") > order.index("-a") and order.index("+c") < order.index("-a")


class _FakeRequest:
    """Enough of a Starlette request for ``_JSONSpec.endpoint``: headers and a streamed body."""

    def __init__(self, body: bytes) -> None:
        self.headers = {"content-length": str(len(body))}
        self._body = body

    async def stream(self):
        for i in range(0, len(self._body), 65536):
            yield self._body[i : i + 65536]


def test_deeply_nested_json_and_oversized_image_sets_are_answered_before_the_queue():
    pytest.importorskip("litserve")
    import asyncio
    import json

    from mmembed.serve.server import EmbeddingSpec

    spec = EmbeddingSpec(Limits(), embed_dim=64)  # no queue attached: reaching it would raise AttributeError
    nested = b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = asyncio.run(spec.endpoint(_FakeRequest(nested)))
    assert r.status_code == 400 and json.loads(r.body)["error"]["code"] == "bad_json"
    big = base64.b64encode(bomb_png(4096, 4096)).decode()
    body = json.dumps({"input": [{"image": big} for _ in range(32)]}).encode()
    r = asyncio.run(spec.endpoint(_FakeRequest(body)))
    assert r.status_code == 413 and json.loads(r.body)["error"]["code"] == "images_too_large"
    assert spec.budget.used == 0


# ------------------------------------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("litserve")
    requests = pytest.importorskip("requests")
    from mmembed.serve.local import LocalServer

    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--device", "cpu", "--threads", "1", "--max-batch-size", "4", "--batch-timeout", "0.05",
            "--max-request-mb", "1", "--max-image-pixels", "1000000"]
    with LocalServer("tiny", args, log_path=log) as srv:
        srv.session = requests.Session()
        yield srv


def _post(server, payload, **kw):
    return server.session.post(server.url + "/v1/embeddings", json=payload, timeout=60, **kw)


@pytest.mark.slow
def test_server_embeddings_equal_embedder_encode(server, tiny_embedder, images):
    assert server.session.get(server.url + "/health", timeout=10).text == "ok"
    img = make_image(64, 48, "blue")
    payload = {"model": "tiny", "role": "candidate", "instruction": INST,
               "input": ["a red circle", {"image": _b64(images[0])},
                         {"image": "data:image/png;base64," + _b64(img), "text": "caption", "kind": "document"}]}
    r = _post(server, payload)
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)
    ref = tiny_embedder.encode([Item(text="a red circle", instruction=INST), Item(image=images[0], instruction=INST),
                                Item(image=img, text="caption", instruction=INST, kind="document")],
                               role="candidate").numpy()
    assert np.abs(got - ref).max() < 1e-5
    assert body["model"] == "tiny" and body["usage"]["prompt_tokens"] > 0
    b64 = _post(server, {**payload, "encoding_format": "base64"}).json()["data"][2]["embedding"]
    assert np.abs(np.frombuffer(base64.b64decode(b64), "<f4") - ref[2]).max() < 1e-5
    q = _post(server, {"input": "a red circle"}).json()["data"][0]["embedding"]
    assert np.abs(np.asarray(q) - tiny_embedder.encode("a red circle", role="query").numpy()).max() < 1e-5


@pytest.mark.slow
def test_server_rejects_bad_input_and_keeps_serving(server):
    cases = [
        ({"input": [{"image": "%%%"}]}, 400, "bad_base64"),
        ({"input": "x", "foo": 1}, 400, "unknown_field"),
        ({"input": []}, 400, "empty_input"),
        ({"input": [{"image": base64.b64encode(bomb_png(2000, 2000)).decode()}]}, 413, "image_too_large"),
    ]
    for payload, status, code in cases:
        r = _post(server, payload)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    r = server.session.post(server.url + "/v1/embeddings", data=b"{not json", timeout=30,
                            headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"
    r = _post(server, {"input": "x" * 20_000, "user": "y" * (2**20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert _post(server, {"input": ["still serving"]}).status_code == 200


@pytest.mark.slow
def test_server_concurrent_requests_are_batched_and_correct(server, tiny_embedder):
    texts = [f"query number {i} about {'long ' * (i % 5)}things" for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: _post(server, {"input": [t]}), texts))
    assert all(r.status_code == 200 for r in results)
    got = torch.tensor([r.json()["data"][0]["embedding"] for r in results])
    assert (got - tiny_embedder.encode(texts, role="query")).abs().max() < 1e-5


@pytest.mark.slow
def test_server_peak_memory_under_image_floods_stays_under_2_gb(tmp_path):
    """The issue's 32 x 4096x4096 PNG request, the largest admitted one, and two of those at once (default limits)."""
    pytest.importorskip("litserve")
    pytest.importorskip("requests")
    from benchmarks.bench_server_memory import GIB, measure

    res = measure("tiny", parallel=2, log_path=tmp_path / "server.log")
    assert res["flood"]["status"] == [413] and res["flood"]["errors"] == ["images_too_large"]
    assert res["largest"]["status"] == [200] and res["parallel"]["status"] == [200]
    for kind in ("flood", "largest", "parallel"):  # sum over the server's processes of their peak RSS
        assert res[kind]["peak_gib"] * GIB < 2e9, res
