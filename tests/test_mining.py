"""Global hard-negative mining end to end: ranks checked against an independent re-ranking, shards read back.

Two tiny datasets are written into a temporary folder:

* ``toy_t2i`` (40 samples): text queries, image positives with ids. Sample 38 repeats sample 1's positive id (merged
  into one corpus entry); sample 39's positive is sample 0's image under another id (an exact duplicate that must
  never be a negative of either). Queries 0-9 list the next sample's positive as a planted false negative.
* ``toy_t2t`` (25 samples): text queries and text positives without ids (deduplicated by content; sample 24 repeats
  sample 0's positive). Its 24-item corpus is shorter than the window end used here, so the window is clamped.
"""

from __future__ import annotations

import json
import logging
import math
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mmembed.data.schema import Sample, Side
from mmembed.data.shards import iter_decoded, write_shards
from mmembed.mining.corpus import content_key
from mmembed.mining.mine import mine_hard_negatives
from mmembed.mining.stats import MiningSummary
from mmembed.types import Item

WINDOW = (5, 30)  # fits toy_t2i's 37-38 filtered candidates, too long for toy_t2t's 22-23 (clamped)
N = 2
RULE_K = 3
BATCH = 16  # blocks of 128 items: one per dataset and role, so the two ranks get two blocks each
IMG_INST = "Represent the given image."
TXT_INST = "Represent the given text."
TOL = 1e-5  # scores closer than this are treated as ties (the tiny random model's embeddings are close)


def _image(i: int) -> Image.Image:
    img = Image.new("RGB", (32, 32), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
    d = ImageDraw.Draw(img)
    d.rectangle([i % 12, (i * 3) % 12, i % 12 + 14, (i * 3) % 12 + 10], fill=((i * 71) % 256, 20, 255 - i * 5))
    return img


def _t2i_samples():
    for i in range(40):
        pid, img = f"toy_t2i/p{i}", _image(i)
        if i == 38:
            pid, img = "toy_t2i/p1", _image(1)  # same id: one corpus entry
        if i == 39:
            pid, img = "toy_t2i/p0dup", _image(0)  # same pixels, other id: an exact duplicate of p0
        meta = {"false_negative_ids": [f"toy_t2i/p{i + 1}"] if i < 10 else []}
        sample = Sample(
            id=f"toy_t2i/{i:04d}", dataset="toy_t2i", task="t2i", meta_task="retrieval",
            query=Side(text=f"a picture with shape {i} in colour {i * 7}", instruction="Find the matching image."),
            positive=Side(image="pos.png", instruction=IMG_INST, id=pid),
            negatives=[Side(text="an old negative to be replaced", instruction=IMG_INST, id="old")], meta=meta)
        yield sample, {"pos.png": img}


def _t2t_samples():
    for i in range(25):
        answer = f"answer number {i % 24} is {'yes ' * (i % 24 % 5)}{i % 24 * 13}"
        sample = Sample(
            id=f"toy_t2t/{i:04d}", dataset="toy_t2t", task="t2t", meta_task="vqa",
            query=Side(text=f"question {i}: what is {i * 3} plus {i}?", instruction="Answer the question."),
            positive=Side(text=answer, instruction=TXT_INST), meta={"i": i})
        yield sample, {}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mining_in")
    return (write_shards(_t2i_samples(), str(root / "toy_t2i-%06d.tar"), maxcount=16)
            + write_shards(_t2t_samples(), str(root / "toy_t2t-%06d.tar"), maxcount=16))


@pytest.fixture(scope="module")
def embedder():
    from mmembed import Embedder

    return Embedder.from_pretrained("tiny", device="cpu")


@pytest.fixture(scope="module")
def window_run(embedder, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("mined_window")
    summary = mine_hard_negatives(embedder, shards, out, window=WINDOW, n=N, seed=0, batch_size=BATCH, maxcount=16)
    t = summary.timing
    print(f"\nmining throughput on the test shards: {summary.queries_per_s:.1f} queries/s "
          f"({summary.queries} queries in {t['total_s']:.2f}s, embedding {t['embed_s']:.2f}s)")
    return out, summary


def _manifest(out) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(embedder, shards):
    """An independent re-ranking: the corpus rebuilt here, embedded separately, scored and sorted with numpy."""
    ref = {}
    for dec in iter_decoded(shards):
        s = dec.sample
        d = ref.setdefault(s.dataset, {"corpus": {}, "queries": [], "positive": {}, "fn": {}})
        pos_img = dec.images.get("pos.png")
        # Id-less positives are named by the documented content id; equality below uses the raw content.
        cid = s.positive.id or f"{s.dataset}/sha1:{content_key(s.positive, pos_img)[:16]}"
        content = (s.positive.text, None if pos_img is None else np.asarray(pos_img).tobytes())
        d["corpus"].setdefault(cid, (Item(text=s.positive.text, image=pos_img, instruction=s.positive.instruction),
                                     content))
        d["queries"].append((s.id, Item(text=s.query.text, instruction=s.query.instruction)))
        d["positive"][s.id] = cid
        d["fn"][s.id] = set(s.meta.get("false_negative_ids", []))
    for d in ref.values():
        ids = list(d["corpus"])
        c = embedder.encode([d["corpus"][i][0] for i in ids], role="candidate", batch_size=16).numpy()
        q = embedder.encode([it for _, it in d["queries"]], role="query", batch_size=16).numpy()
        d["ids"], d["scores"] = ids, q @ c.T
        d["row"] = {qid: r for r, (qid, _) in enumerate(d["queries"])}
    return ref


def _check_rank(scores: np.ndarray, order: list[int], pos: int, chosen: int) -> None:
    """``chosen`` sits at position ``pos`` of ``order``: exactly, or tied in score with whatever is there."""
    if order[pos] != chosen:
        assert abs(scores[order[pos]] - scores[chosen]) < TOL, (pos, order.index(chosen))


def _filtered(ref: dict, dataset: str, qid: str) -> tuple[np.ndarray, list[int], list[int]]:
    """Scores, raw order and filtered order (without the positive and same-content items) for one query."""
    d = ref[dataset]
    scores = d["scores"][d["row"][qid]].astype(np.float64)
    raw = list(np.argsort(-scores, kind="stable"))
    pos_content = d["corpus"][d["positive"][qid]][1]
    dup = {j for j, cid in enumerate(d["ids"]) if d["corpus"][cid][1] == pos_content}
    assert d["ids"].index(d["positive"][qid]) in dup
    return scores, raw, [j for j in raw if j not in dup]


def test_window_negatives_sit_at_reported_ranks_inside_the_window(window_run, reference):
    out, summary = window_run
    rows = _manifest(out)
    assert [r["id"] for r in rows] == [f"toy_t2i/{i:04d}" for i in range(40)] + [f"toy_t2t/{i:04d}" for i in range(25)]
    for row in rows:
        d = reference[row["dataset"]]
        scores, raw, filtered = _filtered(reference, row["dataset"], row["id"])
        assert row["positive_id"] == d["positive"][row["id"]]
        assert len(set(row["negative_ids"])) == N
        lo, hi = WINDOW
        assert row["clamped"] == (len(filtered) < hi)
        if row["clamped"]:  # the sampler's documented clamp: the window scaled to [start*L/end, L)
            assert row["list_length"] == len(filtered)
            lo, hi = min(lo * len(filtered) // hi, len(filtered) - N), len(filtered)
        else:  # searched deep enough that the whole window survives the filtering
            assert row["list_length"] >= hi
        for cid, rank, raw_rank, score in zip(row["negative_ids"], row["ranks"], row["raw_ranks"], row["scores"]):
            j = d["ids"].index(cid)
            assert j in filtered, f"{row['id']}: negative {cid} is the positive or a duplicate of it"
            assert lo <= rank < hi
            _check_rank(scores, filtered, rank, j)
            _check_rank(scores, raw, raw_rank - 1, j)
            assert score == pytest.approx(scores[j], abs=TOL)
    # The exact duplicate under another id is never a negative of the sample whose positive it copies (or back).
    by_id = {r["id"]: r for r in rows}
    assert "toy_t2i/p0dup" not in by_id["toy_t2i/0000"]["negative_ids"]
    assert "toy_t2i/p0" not in by_id["toy_t2i/0039"]["negative_ids"]
    a = summary.datasets["toy_t2i"]
    assert (a.queries, a.corpus_size, a.merged_positives, a.clamped_queries) == (40, 39, 1, 0)
    assert WINDOW[0] <= a.rank_min and a.rank_max < WINDOW[1]


def test_rule_strategy_is_top_k_minus_ground_truth(embedder, shards, reference, tmp_path):
    summary = mine_hard_negatives(embedder, shards, tmp_path, strategy="rule", k=RULE_K, batch_size=BATCH)
    picked = 0
    for row in _manifest(tmp_path):
        d = reference[row["dataset"]]
        scores, _, filtered = _filtered(reference, row["dataset"], row["id"])
        assert row["ranks"] == list(range(RULE_K)) and row["window"] is None and row["strategy"] == "rule"
        for rank, cid in enumerate(row["negative_ids"]):
            _check_rank(scores, filtered, rank, d["ids"].index(cid))
        hits = [c for c in row["negative_ids"] if c in d["fn"][row["id"]]]
        assert row["false_negatives_picked"] == hits
        picked += len(hits)
    a = summary.datasets["toy_t2i"]
    assert a.negatives_per_query == RULE_K and a.clamped_queries == 0 and a.clamp_warning is None
    # The planted false negatives are counted against the truth: 10 planted, each picked iff it made the top-K.
    assert (a.false_negatives_planted, a.queries_with_false_negatives) == (10, 10)
    assert a.false_negatives_picked == picked
    assert summary.datasets["toy_t2t"].false_negatives_picked is None  # no planted list in its meta


def test_output_shards_carry_the_manifest_negatives_and_lose_nothing(window_run, shards):
    out, summary = window_run
    inputs = {d.sample.id: d for d in iter_decoded(shards)}
    corpus: dict[str, tuple[str | None, np.ndarray | None]] = {}
    for d in inputs.values():
        img = d.images.get("pos.png")
        cid = d.sample.positive.id
        if cid:
            corpus.setdefault(cid, (d.sample.positive.text, None if img is None else np.asarray(img)))
    texts = {d.sample.positive.text for d in inputs.values() if not d.sample.positive.id}
    rows = {r["id"]: r for r in _manifest(out)}
    decoded = list(iter_decoded(str(out / "shards")))
    assert sorted(d.sample.id for d in decoded) == sorted(inputs) and len(decoded) == 65
    assert sorted(summary.shards) == sorted(str(p) for p in (out / "shards").glob("*.tar"))
    for d in decoded:
        s, row = d.sample, rows[d.sample.id]
        src = inputs[s.id].sample
        assert (s.query, s.positive) == (src.query, src.positive)
        assert s.meta["mined_negatives"]["ranks"] == row["ranks"]
        assert s.meta.get("false_negative_ids") == src.meta.get("false_negative_ids")
        assert [n.id for n in s.negatives] == row["negative_ids"] and len(s.negatives) == N  # old one replaced
        _, _, negs = d.items()
        for side, item in zip(s.negatives, negs):
            if s.dataset == "toy_t2i":
                text, pixels = corpus[side.id]
                assert side.image is not None and item.text == text and item.instruction == IMG_INST
                assert np.array_equal(np.asarray(item.image), pixels)
            else:
                assert side.image is None and item.text in texts and item.instruction == TXT_INST
                assert side.id == f"toy_t2t/sha1:{content_key(side, None)[:16]}"


def test_rank_split_equals_single_run_and_is_deterministic(embedder, shards, window_run, tmp_path):
    out, _ = window_run
    split = tmp_path / "split"
    assert mine_hard_negatives(embedder, shards, split, window=WINDOW, n=N, seed=0, batch_size=BATCH, maxcount=16,
                               world_size=2, rank=1) is None
    assert (split / "tmp" / "part-001-of-002.pt").exists()
    merged = mine_hard_negatives(embedder, shards, split, window=WINDOW, n=N, seed=0, batch_size=BATCH, maxcount=16,
                                 world_size=2, rank=0)
    assert isinstance(merged, MiningSummary) and merged.world_size == 2
    assert (split / "manifest.jsonl").read_bytes() == (out / "manifest.jsonl").read_bytes()
    single = sorted(p.name for p in (out / "shards").glob("*.tar"))
    assert single == sorted(p.name for p in (split / "shards").glob("*.tar"))
    for name in single:  # shard writing is byte-reproducible, so equal content means equal bytes
        assert (split / "shards" / name).read_bytes() == (out / "shards" / name).read_bytes()
    assert not (split / "tmp").exists()  # parts are removed once merged
    # The split run is also the second run with the same seed: byte-identical manifest = deterministic mining.
    # (Different seeds are checked with the fast stand-in embedder below.)


def test_window_clamp_and_throughput_are_reported(window_run, caplog):
    out, summary = window_run
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary.to_json()))
    small, large = saved["datasets"]["toy_t2t"], saved["datasets"]["toy_t2i"]
    assert (small["queries"], small["corpus_size"], small["merged_positives"]) == (25, 24, 1)
    assert small["clamped_queries"] == 25 and small["shortest_list"] == 23  # the 24 unique answers minus the positive
    assert "scaled" in small["clamp_warning"]
    assert large["clamped_queries"] == 0 and large["clamp_warning"] is None
    assert saved["queries"] == 65 and saved["queries_per_s"] > 0 and saved["window"] == list(WINDOW)
    assert math.isclose(saved["queries_per_s"], 65 / saved["timing"]["total_s"], rel_tol=0.05)


class _HashEmbedder:
    """A fast stand-in embedder (text hash -> unit vector) for argument and merge checks that need no model."""

    device = torch.device("cpu")

    def encode(self, items, role="query", batch_size=16, show_progress=None):
        rows = [np.random.default_rng(zlib.crc32(f"{role}/{it.text}".encode())).normal(size=8) for it in items]
        x = torch.tensor(np.stack(rows), dtype=torch.float32)
        return torch.nn.functional.normalize(x, dim=1)


def _text_shards(tmp_path, name: str, count: int) -> list[str]:
    samples = ((Sample(id=f"{name}/{i}", dataset=name, task="t2t", meta_task="vqa", query=Side(text=f"q{i}"),
                       positive=Side(text=f"p{i}")), {}) for i in range(count))
    return write_shards(samples, str(tmp_path / f"in_{name}" / f"{name}-%06d.tar"))


def test_settings_parts_seeds_and_log_lines(tmp_path, caplog):
    shards = _text_shards(tmp_path, "few", 6)
    emb = _HashEmbedder()
    with pytest.raises(ValueError, match="strategy"):
        mine_hard_negatives(emb, shards, tmp_path / "o", strategy="top")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k is the rule"):
        mine_hard_negatives(emb, shards, tmp_path / "o", k=3)
    with pytest.raises(ValueError, match="rank"):
        mine_hard_negatives(emb, shards, tmp_path / "o", world_size=2, rank=2)
    # 6 positives minus the ground truth leave 5 candidates per query: too few for 10 (or 9) negatives.
    with pytest.raises(ValueError, match="'few'.*fewer than n=10"):
        mine_hard_negatives(emb, shards, tmp_path / "o", window=(0, 10), n=10)
    # The rule strategy clamps top-K to what the corpus holds (as the window clamps), reported in the summary.
    clamped = mine_hard_negatives(emb, shards, tmp_path / "rule9", strategy="rule", k=9)
    few = clamped.datasets["few"]
    assert few.negatives_per_query == 5 and few.clamped_queries == 6
    assert "clamped to top-5" in few.clamp_warning
    assert all(len(r["negative_ids"]) == 5 for r in _manifest(tmp_path / "rule9"))

    # A part written for other shards is not merged silently.
    other = _text_shards(tmp_path, "other", 7)
    mine_hard_negatives(emb, other, tmp_path / "m", window=(1, 4), world_size=2, rank=1)
    with pytest.raises(ValueError, match="other shards"):
        mine_hard_negatives(emb, shards, tmp_path / "m", window=(1, 4), world_size=2, rank=0, part_timeout_s=1)

    with caplog.at_level(logging.INFO, logger="mmembed.mining.mine"):
        summary = mine_hard_negatives(emb, shards, tmp_path / "ok", window=(1, 4), n=2, seed=3)
    assert summary.datasets["few"].clamped_queries == 0
    manifest = (tmp_path / "ok" / "manifest.jsonl").read_bytes()
    mine_hard_negatives(emb, shards, tmp_path / "ok", window=(1, 4), n=2, seed=3)
    assert (tmp_path / "ok" / "manifest.jsonl").read_bytes() == manifest
    mine_hard_negatives(emb, shards, tmp_path / "seed4", window=(1, 4), n=2, seed=4)
    assert (tmp_path / "seed4" / "manifest.jsonl").read_bytes() != manifest
    assert any("queries/s" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("mined few: 6 queries, corpus 6") for r in caplog.records)


def test_content_key_ignores_instruction_and_tells_text_from_pixels():
    img = _image(3)
    assert content_key(Side(text="a", instruction="x"), None) == content_key(Side(text="a", instruction="y"), None)
    assert content_key(Side(text="a"), None) != content_key(Side(text="a", image="pos.png"), img)
    assert content_key(Side(image="pos.png"), img) == content_key(Side(image="pos.png"), img.copy())
    assert content_key(Side(image="pos.png"), img) != content_key(Side(image="pos.png"), _image(4))


def test_cli_mines_with_a_preset_model(tmp_path, capsys):
    from mmembed.mining import cli

    shards = _text_shards(tmp_path, "few", 6)
    assert cli.main(["--model", "tiny", "--device", "cpu", "--shards", *shards, "--out", str(tmp_path / "out"),
                     "--strategy", "rule", "--k", "2", "--batch-size", "8"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["strategy"] == "rule" and summary["k"] == 2 and summary["datasets"]["few"]["queries"] == 6
    assert "queries/s" in capsys.readouterr().out
