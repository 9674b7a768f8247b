"""The server as the official ``openai`` client sees it: image data URLs as strings, image+text through
``extra_body``, ``dimensions`` (Matryoshka truncation), the start-up line and a clean SIGTERM."""

from __future__ import annotations

import base64
import io
import signal

import numpy as np
import pytest

from mmembed import Item
from mmembed.serve.protocol import EmbeddingJob, Limits, RequestError, parse_embedding_request

from .conftest import make_image

INST = "Find me an everyday image that matches the given query."


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_data_url_string_is_an_image_and_dimensions_are_checked():
    img = make_image(40, 30, "green")
    job = parse_embedding_request({"input": [_data_url(img), "data:text/plain,hello", "plain"],
                                   "instruction": INST, "dimensions": 16}, Limits(), embed_dim=64)
    a, b, c = job.items
    assert a.text is None and a.instruction == INST and np.array_equal(np.asarray(a.image), np.asarray(img))
    assert b == Item(text="data:text/plain,hello", instruction=INST)  # only image data URLs are images
    assert c.text == "plain" and job.dimensions == 16
    single = parse_embedding_request({"input": _data_url(img)}, Limits(), embed_dim=64)
    assert single.items[0].image is not None and single.dimensions is None
    with pytest.raises(RequestError, match=r"input\[0\] is not valid base64"):
        parse_embedding_request({"input": "data:image/png;base64,@@@"}, Limits(), embed_dim=64)
    for bad in (0, 65, True, "16", 8.0):
        with pytest.raises(RequestError, match="give an integer from 1 to 64") as info:
            parse_embedding_request({"input": "x", "dimensions": bad}, Limits(), embed_dim=64)
        assert info.value.status == 400 and info.value.param == "dimensions"


def test_worker_truncates_each_request_to_its_own_dimensions(tiny_embedder):
    pytest.importorskip("litserve")
    from mmembed.serve.server import EmbeddingAPI

    api = EmbeddingAPI("tiny", max_batch_size=4)
    api.embedder = tiny_embedder
    texts = [["a red circle"], ["two squares", "a page"], ["a blue sky"]]
    jobs = [EmbeddingJob([Item(text=t) for t in ts], dimensions=d) for ts, d in zip(texts, (16, None, 64))]
    out = api.predict(jobs)  # one batch mixing three different "dimensions"
    for job, res in zip(jobs, out):
        ref = tiny_embedder.encode(job.items, truncate_dim=job.dimensions).numpy()
        got = np.asarray(res["embeddings"])
        assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-5
    assert np.allclose(np.linalg.norm(np.asarray(out[0]["embeddings"]), axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("litserve")
    openai = pytest.importorskip("openai")
    from mmembed.serve.local import LocalServer

    log = tmp_path_factory.mktemp("serve_openai") / "server.log"
    srv = LocalServer("tiny", ["--device", "cpu", "--threads", "1"], log_path=log)
    with srv:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield srv


def _vec(response, i: int = 0) -> np.ndarray:
    return np.asarray(response.data[i].embedding, dtype=np.float32)


@pytest.mark.slow
def test_openai_client_text_images_image_text_and_dimensions(served, tiny_embedder, images):
    client = served.client
    r = client.embeddings.create(model="tiny", input=["a red circle", "two squares"])
    ref = tiny_embedder.encode(["a red circle", "two squares"], role="query").numpy()
    assert np.abs(np.stack([_vec(r, 0), _vec(r, 1)]) - ref).max() < 1e-5
    assert r.usage.prompt_tokens == sum(tiny_embedder.input_builder.num_tokens([Item(text="a red circle"),
                                                                               Item(text="two squares")], "query"))

    r = client.embeddings.create(model="tiny", input=_data_url(images[0]),
                                 extra_body={"role": "candidate", "instruction": INST})
    ref = tiny_embedder.encode(Item(image=images[0], instruction=INST), role="candidate").numpy()
    assert np.abs(_vec(r) - ref).max() < 1e-5  # an image, not the data URL's text

    pair = {"text": "a caption", "image": _data_url(images[1]), "kind": "document"}
    r = client.embeddings.create(model="tiny", input="ignored", extra_body={"input": [pair], "role": "candidate"})
    ref = tiny_embedder.encode(Item(text="a caption", image=images[1], kind="document"), role="candidate").numpy()
    assert np.abs(_vec(r) - ref).max() < 1e-5

    r = client.embeddings.create(model="tiny", input="a red circle", dimensions=16)
    ref = tiny_embedder.encode("a red circle", role="query", truncate_dim=16).numpy()
    assert _vec(r).shape == (16,) and np.abs(_vec(r) - ref).max() < 1e-5
    # The client asks for base64 by default and decodes it (all calls above); asked for explicitly, it hands the
    # little-endian float32 string back as it came.
    r = client.embeddings.create(model="tiny", input="a red circle", dimensions=16, encoding_format="base64")
    assert np.abs(np.frombuffer(base64.b64decode(r.data[0].embedding), "<f4") - ref).max() < 1e-5

    import openai

    with pytest.raises(openai.BadRequestError, match="give an integer from 1 to 64"):
        client.embeddings.create(model="tiny", input="x", dimensions=100)


@pytest.mark.slow
def test_startup_line_and_sigterm_exit_cleanly(served):
    # Runs after the client test (file order): stops the module's server with a plain SIGTERM.
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=60) == 0
    log = served.log_path.read_text()
    assert f"mmembed-serve: tiny (64-d embeddings) on {served.url}" in log.splitlines()[0]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-2000:]
