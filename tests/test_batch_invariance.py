"""An item's embedding, and a reranker's score, must not depend on the batch it is computed in (issue 25, item 9).

Every path that embeds is checked against the same reference, each item encoded alone (fp32, CPU, bound 1e-5):
``Embedder.encode`` (batch sizes, length sorting on/off, input order), the MMEB eval runner, the index builder, the
server's worker (requests batched together by LitServe) and the real server over HTTP (slow); and
``Reranker.score`` for P(Yes). The items mix lengths on purpose: short and long text, natural images with and
without text, and documents cut into different numbers of tiles, so a batch pads rows by very different amounts.
"""

from __future__ import annotations

import base64
import io
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mmembed import Item
from mmembed.data.evalsets import MMEBRow, MMEBSubset
from mmembed.eval.mmeb import evaluate_subset, row_scores
from mmembed.index import build_index
from mmembed.index.corpus import Corpus

from .conftest import make_image

TOL = 1e-5
INST = "Find me an everyday image that matches the given query."


def _items() -> list[Item]:
    return [
        Item(text="a red circle", instruction=INST),
        Item(text="x"),
        Item(text="a much longer query about two green squares at the top left of a striped background " * 4,
             instruction=INST),
        Item(image=make_image(color="green", seed=1)),
        Item(image=make_image(color="blue", seed=2), text="what colour is the circle?",
             instruction="Represent the given image with the following question."),
        Item(image=make_image(300, 120, "blue"), kind="document"),  # a wide page: several tiles + thumbnail
        Item(image=make_image(200, 700, "red", seed=3), text="page two", kind="document"),  # a tall page
    ]


def _orders(n: int) -> list[list[int]]:
    shuffled = list(range(n))
    random.Random(0).shuffle(shuffled)
    return [list(range(n)), list(reversed(range(n))), shuffled]


@pytest.fixture(scope="module")
def items() -> list[Item]:
    return _items()


@pytest.fixture(scope="module")
def alone(tiny_embedder, items) -> dict[str, torch.Tensor]:
    """The reference: each item encoded in a batch of its own, per role."""
    return {role: torch.cat([tiny_embedder.encode([it], role=role) for it in items])
            for role in ("query", "candidate")}


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


def test_the_items_really_pad_differently(tiny_embedder, items):
    # Guard on the test itself: the batch must mix short and long rows, or padding would go untested.
    lengths = tiny_embedder.input_builder.num_tokens(items, "candidate")
    assert max(lengths) > 4 * min(lengths)
    assert len({tiny_embedder.input_builder.num_tiles(it) for it in items if it.image is not None}) >= 2


def _cases(n: int) -> list[tuple[int, bool, list[int]]]:
    """(batch size, sort by length, input order): each size, sorting on and off, three input orders."""
    ident, rev, shuffled = _orders(n)
    return [(2, True, shuffled), (2, False, rev), (3, False, shuffled), (3, True, ident), (n, False, ident),
            (n, True, rev)]


@pytest.mark.parametrize("role", ["query", "candidate"])
def test_encode_is_batch_invariant(tiny_embedder, items, alone, role):
    for batch_size, sort, order in _cases(len(items)):
        got = tiny_embedder.encode([items[i] for i in order], role=role, batch_size=batch_size, sort_by_length=sort)
        diff = _max_diff(got, alone[role][order])
        assert diff < TOL, (role, batch_size, sort, order, diff)


def test_eval_runner_scores_are_batch_invariant(tiny_embedder, items, alone):
    # Every item is a query; each row ranks all items as candidates, its own first (MMEB's local candidate lists).
    n = len(items)
    subset = MMEBSubset("mixed", list(items), list(items),
                        [MMEBRow(q, [q] + [c for c in range(n) if c != q]) for q in range(n)])
    ref, _ = row_scores(alone["query"], alone["candidate"], subset)
    for batch_size in (1, 3, 16):
        _, scores, _ = evaluate_subset(tiny_embedder, subset, batch_size=batch_size, show_progress=False)
        assert _max_diff(scores, ref) < TOL, batch_size


def test_index_builder_vectors_are_batch_invariant(tiny_embedder, items, alone, tmp_path):
    ids = [f"doc{i}" for i in range(len(items))]
    corpus = Corpus(ids, list(items), [{} for _ in items], source="mixed")
    for batch_size, chunk_size in ((1, 1), (2, 3), (32, 1024)):
        index = build_index(tiny_embedder, corpus, tmp_path / f"idx_{batch_size}_{chunk_size}", model="tiny",
                            batch_size=batch_size, chunk_size=chunk_size, show_progress=False)
        assert _max_diff(index.vectors_for(ids), alone["candidate"]) < TOL, (batch_size, chunk_size)


def test_server_worker_embeddings_do_not_depend_on_the_requests_batched_with_them(tiny_embedder, items, alone):
    pytest.importorskip("litserve")
    from mmembed.serve.protocol import EmbeddingJob
    from mmembed.serve.server import EmbeddingAPI

    api = EmbeddingAPI("tiny", max_batch_size=8, encode_batch_size=3)
    api.embedder = tiny_embedder  # what setup() loads, without building the model again
    # Requests of one item and of several, both roles, grouped into one dynamic batch in two different orders.
    jobs = [EmbeddingJob([items[i]], role="query") for i in range(len(items))]
    jobs += [EmbeddingJob(items[4:], role="candidate"), EmbeddingJob(items[:3], role="query"),
             EmbeddingJob([items[2]], role="candidate")]
    refs = [alone[job.role][[items.index(it) for it in job.items]] for job in jobs]
    for order in _orders(len(jobs))[1:]:
        out = api.unbatch(api.predict(api.batch([api.decode_request(jobs[j]) for j in order])))
        for j, res in zip(order, out):
            assert _max_diff(res["embeddings"], refs[j]) < TOL, (order, j)


def test_reranker_scores_are_batch_invariant(items):
    from mmembed import Reranker

    rr = Reranker.from_pretrained("tiny", device="cpu")
    query = Item(text="which picture shows a red circle?", instruction=INST)
    alone = torch.cat([rr.score(query, [c]) for c in items])
    for batch_size, _, order in _cases(len(items))[::2]:
        got = rr.score(query, [items[i] for i in order], batch_size=batch_size)
        assert _max_diff(got, alone[order]) < TOL, (batch_size, order)
    # The E+R hook scores a shortlist: a candidate's score does not depend on the others in it.
    assert _max_diff(rr.rerank(query, items[2:5]), alone[2:5]) < TOL


# ------------------------------------------------------------------------------------------- the real server
def _payload_item(item: Item) -> dict | str:
    if item.image is None:
        return {"text": item.text, "instruction": item.instruction} if item.instruction else item.text
    buf = io.BytesIO()
    item.image.save(buf, format="PNG")  # lossless: the server decodes the very pixels encoded here
    out = {"image": base64.b64encode(buf.getvalue()).decode(), "kind": item.kind}
    return {**out, **({"text": item.text} if item.text else {}),
            **({"instruction": item.instruction} if item.instruction else {})}


@pytest.mark.slow  # starts mmembed-serve (the tiny model in a LitServe worker): 45 s measured under load
def test_server_embeddings_are_batch_invariant_over_http(items, alone, tmp_path):
    pytest.importorskip("litserve")
    requests = pytest.importorskip("requests")
    from mmembed.serve.local import LocalServer

    args = ["--device", "cpu", "--threads", "1", "--max-batch-size", "8", "--batch-timeout", "0.2"]
    with LocalServer("tiny", args, log_path=tmp_path / "server.log") as srv:
        session = requests.Session()

        def post(role: str, idx: list[int]) -> np.ndarray:
            r = session.post(srv.url + "/v1/embeddings", timeout=120,
                             json={"role": role, "input": [_payload_item(items[i]) for i in idx]})
            assert r.status_code == 200, r.text
            return np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32)

        n = len(items)
        # One request with everything (in two orders), then one request per item sent at once so that the
        # server groups them with each other into dynamic batches.
        for role in ("query", "candidate"):
            for order in _orders(n)[1:]:
                assert _max_diff(post(role, order), alone[role][order]) < TOL, (role, order)
            with ThreadPoolExecutor(n) as pool:
                singles = list(pool.map(lambda i, r=role: post(r, [i])[0], range(n)))
            assert _max_diff(np.stack(singles), alone[role]) < TOL, role
