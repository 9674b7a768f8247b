"""Stage-3 retrieve-and-judge curation: decisions follow the logits, the ground truth is never a negative,
binary-label datasets are not judged, the judging is cached across n / strategy, ranks merge to the same result."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from mmembed.data.schema import Sample, Side
from mmembed.data.shards import iter_decoded, write_shards
from mmembed.judge import Judge, JudgePair
from mmembed.judge.curate import choose, curate, decide, judge_candidates, retrieve_candidates, write_curated
from mmembed.types import Item

K = 4
T2I = 6  # text -> image queries (the first half with a planted false negative)


def _image(i: int) -> Image.Image:
    img = Image.new("RGB", (32, 32), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
    ImageDraw.Draw(img).rectangle([i % 9, (i * 3) % 9, i % 9 + 14, (i * 3) % 9 + 10], fill=(255 - i * 9, 20, 90))
    return img


def _write(tmp_path):
    samples = []
    for i in range(T2I):  # text -> image; the first half lists the next positive as a planted false negative
        meta = {"false_negative_ids": [f"toy_t2i/p{i + 1}"] if i < T2I // 2 else [], "analog": "MSCOCO_t2i"}
        samples.append((Sample(id=f"toy_t2i/{i:03d}", dataset="toy_t2i", task="t2i", meta_task="retrieval",
                               query=Side(text=f"a picture with shape {i}", instruction="Find the image."),
                               positive=Side(image="pos.png", instruction="Represent the given image.",
                                             id=f"toy_t2i/p{i}"), meta=meta), {"pos.png": _image(i)}))
    for i in range(4):  # binary labels (a HatefulMemes analog): never judged
        label = "yes" if i % 2 else "no"
        samples.append((Sample(id=f"toy_bin/{i:03d}", dataset="toy_bin", task="i2t", meta_task="classification",
                               query=Side(image="query.png", instruction="Is it hateful?"),
                               positive=Side(text=label, id=f"toy_bin/{label}"),
                               meta={"analog": "HatefulMemes", "false_negative_ids": []}),
                        {"query.png": _image(20 + i)}))
    shards = tmp_path / "in"
    shards.mkdir()
    write_shards(iter(samples), str(shards / "train-%06d.tar"), maxcount=8)
    return str(shards / "*.tar")


@pytest.fixture(scope="module")
def judge():
    """The tiny kit judge with an output layer that says 'yes' on one side of a hyperplane through a typical pair's
    final hidden state and 'no' on the other: mixed decisions, each following the logits."""
    j = Judge.from_pretrained("tiny", device="cpu")
    ref = JudgePair(Item(text="a picture with shape 2"), Item(image=_image(3)), "Determine whether it matches.")
    text, _, q, t = j.render(ref)
    batch = j._collate([j._process(text, q + t)])
    with torch.no_grad():
        h_ref = j._forward(batch)[0, -1]
    hidden = h_ref.shape[0]
    head = torch.nn.Linear(hidden, len(j.tokenizer), bias=True)
    w = torch.randn(hidden, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-100.0)
        head.weight[j.yes_ids[0]], head.bias[j.yes_ids[0]] = w, -(w @ h_ref)
        head.weight[j.no_ids[0]], head.bias[j.no_ids[0]] = -w, w @ h_ref
    j.model.set_output_embeddings(head)
    return j


def test_decide_and_choose_by_hand():
    assert decide([2.0, -1.0, 0.5], [1.0, 0.0, 0.5], 3) == ["yes", "no", "no"]  # ties are not relevant
    assert decide(None, None, 2) == ["unjudged", "unjudged"]
    ids, dec = ["a", "b", "c", "d"], ["no", "yes", "no", "no"]
    assert choose(ids, dec, 2, "judge") == (["a", "c"], ["b"])
    assert choose(ids, dec, 2, "rule") == (["a", "b"], [])
    assert choose(ids, dec, 0, "judge") == ([], ["b"])
    assert choose(ids, ["unjudged"] * 4, 3, "judge") == (["a", "b", "c"], [])


def test_curate_end_to_end(tmp_path, tiny_embedder, judge, monkeypatch):
    shards = _write(tmp_path)
    cache = tmp_path / "cache"
    s = curate(tiny_embedder, judge, shards, tmp_path / "judge2", k=K, max_negatives=2, cache_dir=cache,
               batch_size=4)
    rows = [json.loads(line) for line in (tmp_path / "judge2" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == T2I + 4 and s.queries == T2I + 4
    positives = {d.sample.id: d.sample.positive.id for d in iter_decoded(shards)}
    saw = set()
    for r in rows:
        assert positives[r["id"]] not in r["candidate_ids"]  # the ground truth is never a candidate (nor negative)
        if r["dataset"] == "toy_bin":
            assert r["yes"] is None and set(r["decisions"]) == {"unjudged"}
            assert r["negative_ids"] == r["candidate_ids"][:2] and r["extra_positive_ids"] == []
            continue
        # top K minus the ground truth (all K when the ground truth was not retrieved)
        assert len(r["candidate_ids"]) in (K - 1, K) and set(r["ranks"]) <= set(range(1, K + 1))
        assert r["ranks"] == sorted(r["ranks"])
        want = ["yes" if y > n else "no" for y, n in zip(r["yes"], r["no"])]
        assert r["decisions"] == want
        saw |= set(want)
        assert r["negative_ids"] == [c for c, d in zip(r["candidate_ids"], want) if d == "no"][:2]
        assert r["extra_positive_ids"] == [c for c, d in zip(r["candidate_ids"], want) if d == "yes"]
    assert saw == {"yes", "no"}  # the test judge says both
    assert s.datasets["toy_bin"].judged is False and s.skipped_datasets == ["toy_bin"]
    t2i = s.datasets["toy_t2i"]
    assert t2i.judged and t2i.fn_planted == T2I // 2 and t2i.judged_yes + t2i.judged_no == t2i.candidates
    by_id = {r["id"]: r for r in rows}
    fn_rule = sum(len(set(r["false_negative_ids"]) & set(r["candidate_ids"][:2])) for r in by_id.values())
    fn_judge = sum(len(set(r["false_negative_ids"]) & set(r["negative_ids"])) for r in by_id.values())
    assert (t2i.fn_negative_rule, t2i.fn_negative_judge) == (fn_rule, fn_judge)

    # shards read back: negatives and extra positives with their images, in manifest order
    for dec in iter_decoded(sorted(map(str, (tmp_path / "judge2" / "shards").glob("*.tar")))):
        r = by_id[dec.sample.id]
        assert [n.id for n in dec.sample.negatives] == r["negative_ids"]
        assert [x.id for x in dec.sample.extra_positives] == r["extra_positive_ids"]
        for j, x in enumerate(dec.sample.extra_positives):
            assert x.image is None or dec.images[f"xpos{j}.png"].size == (32, 32)

    # a second n and the rule strategy reuse the cached retrieval and judgments: the judge is not called again
    monkeypatch.setattr(judge, "score", lambda *a, **k: pytest.fail("judged again despite the cache"))
    rule = curate(tiny_embedder, judge, shards, tmp_path / "rule3", k=K, max_negatives=3, strategy="rule",
                  cache_dir=cache)
    judge4 = curate(tiny_embedder, judge, shards, tmp_path / "judge4", k=K, max_negatives=4, cache_dir=cache)
    assert rule.totals["negatives"] == T2I * 3 + 4 * 1 and rule.totals["extra_positives"] == 0  # toy_bin: 1 left
    assert judge4.n == 4 and judge4.totals["judged_yes"] == s.totals["judged_yes"]


def test_ranks_merge_to_the_single_rank_result(tmp_path, tiny_embedder, judge):
    """Judging shared by two ranks (run one after the other, rank 0 last) gives the single-rank judgments.

    Retrieval is shared out by the mining code, whose split is tested in test_mining; here one retrieval serves both.
    """
    import shutil

    shards = _write(tmp_path)
    single_r = retrieve_candidates(tiny_embedder, shards, tmp_path / "c1", k=K, batch_size=2)
    single = judge_candidates(judge, shards, tmp_path / "c1", batch_size=4)
    (tmp_path / "c2").mkdir()
    shutil.copy(tmp_path / "c1" / "retrieval.json", tmp_path / "c2" / "retrieval.json")
    assert judge_candidates(judge, shards, tmp_path / "c2", batch_size=4, world_size=2, rank=1) is None
    split = judge_candidates(judge, shards, tmp_path / "c2", batch_size=4, world_size=2, rank=0)
    for qid, row in single.items():
        assert split[qid]["judged"] == row["judged"]
        if row["judged"]:
            torch.testing.assert_close(torch.tensor(split[qid]["yes"]), torch.tensor(row["yes"]), atol=1e-4, rtol=0)
    s0 = write_curated(shards, single_r, single, tmp_path / "o0", n=0)
    assert s0.totals["negatives"] == 0
    with pytest.raises(ValueError, match="needs a judge"):
        curate(tiny_embedder, None, shards, tmp_path / "x", strategy="judge")
