"""The simulated expert judge (synthetic world only) and the margin control of stage-3 curation.

The judge answers from ids alone, so the shards here are text-only (fast to embed): ``Q`` retrieval queries, each
with ``FN`` other positives listed as planted false negatives. Measured recall / false-yes rate must match the
settings; data without ground truth is refused in one line; answers are deterministic; the settings are part of the
judgment cache key. The margin control is checked on hand-made scores.
"""

from __future__ import annotations

import importlib
import json
import random

import pytest

from mmembed.data.schema import Sample, Side
from mmembed.data.shards import write_shards
from mmembed.judge import SIMULATED_LABEL, SimulatedJudge, judge_label, load_judge
from mmembed.judge.curate import JUDGMENTS_FILE, choose, curate, within_margin, write_curated
from mmembed.judge.simulated import ANSWER_LOGIT, NoGroundTruthError, score_percentiles

Q = 160  # queries
FN = 24  # planted false negatives per query (ids of other positives)
K = 20


def _write_text(tmp_path, *, ground_truth: bool = True, n: int = Q, fn: int = FN, name: str = "in") -> str:
    """Text-to-text retrieval samples; query i's planted false negatives are the next ``fn`` positives (cyclic)."""
    samples = []
    for i in range(n):
        fns = [f"toy/p{(i + j) % n}" for j in range(1, fn + 1)]
        meta = {"false_negative_ids": fns} if ground_truth else {}
        samples.append((Sample(id=f"toy/{i:04d}", dataset="toy", task="t2t", meta_task="retrieval",
                               query=Side(text=f"query number {i} about topic {i % 7}", instruction="Find it."),
                               positive=Side(text=f"passage {i} on topic {i % 7}", id=f"toy/p{i}"), meta=meta), {}))
    folder = tmp_path / name
    folder.mkdir()
    write_shards(iter(samples), str(folder / "train-%06d.tar"), maxcount=100)
    return str(folder / "*.tar")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_embedder):
    """Shards plus one shared retrieval cache (the tiny embedder retrieves once for every test)."""
    tmp = tmp_path_factory.mktemp("sim")
    shards = _write_text(tmp)
    curate(tiny_embedder, None, shards, tmp / "warm", k=K, max_negatives=4, strategy="rule", cache_dir=tmp / "cache")
    return tmp, shards


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_measured_recall_and_false_yes_rate_match_the_settings(world, tiny_embedder):
    tmp, shards = world
    for recall, fyr, seed in ((0.9, 0.05, 0), (0.6, 0.2, 1)):
        judge = SimulatedJudge(recall=recall, false_yes_rate=fyr, seed=seed)
        s = curate(tiny_embedder, judge, shards, tmp / f"sim{seed}", k=K, max_negatives=12, cache_dir=tmp / "cache")
        fn_pairs = fn_yes = other_pairs = other_yes = 0
        for r in _rows(tmp / f"sim{seed}"):
            planted = set(r["false_negative_ids"])
            for cid, d in zip(r["candidate_ids"], r["decisions"]):
                if cid in planted:
                    fn_pairs, fn_yes = fn_pairs + 1, fn_yes + (d == "yes")
                else:
                    other_pairs, other_yes = other_pairs + 1, other_yes + (d == "yes")
        assert fn_pairs >= 300 and other_pairs >= 1000  # enough pairs for +-0.05 to be several standard errors
        assert abs(fn_yes / fn_pairs - recall) <= 0.05, (fn_yes, fn_pairs)
        assert abs(other_yes / other_pairs - fyr) <= 0.05, (other_yes, other_pairs)
        assert s.totals["yes_recall"] == round(fn_yes / fn_pairs, 4)  # the summary's figures are the same measurement
        assert s.totals["false_yes_rate"] == round(other_yes / other_pairs, 4)
        assert s.judge == SIMULATED_LABEL and s.judge_settings["recall"] == recall
        assert s.totals["fn_negative_judge"] < s.totals["fn_negative_rule"]  # it removes false negatives


def test_false_yes_rate_rises_with_the_score_percentile():
    judge = SimulatedJudge(recall=1.0, false_yes_rate=0.1, seed=3)
    rng = random.Random(0)
    by_quarter = [[0, 0] for _ in range(4)]
    for q in range(3000):
        scores = sorted((rng.random() for _ in range(19)), reverse=True)
        ids = [f"c{q}/{j}" for j in range(19)]
        for j, yes in enumerate(judge.answer(f"q{q}", set(), ids, scores)):
            quarter = min(3, (18 - j) * 4 // 19)  # 0 = lowest scores, 3 = highest
            by_quarter[quarter][0] += yes
            by_quarter[quarter][1] += 1
    rates = [y / n for y, n in by_quarter]
    assert rates == sorted(rates) and rates[3] > 3 * rates[0]  # hardest candidates draw the most false 'yes'
    assert abs(sum(y for y, _ in by_quarter) / sum(n for _, n in by_quarter) - 0.1) < 0.01  # the mean is the setting
    assert score_percentiles([0.3, 0.1, 0.3]) == [0.75, 0.0, 0.75] and score_percentiles([2.0]) == [0.5]


def test_answers_are_deterministic_and_seeded():
    judge = SimulatedJudge(recall=0.5, false_yes_rate=0.25, seed=7)
    ids, scores, truth = [f"c{j}" for j in range(40)], [1 - j / 40 for j in range(40)], {f"c{j}" for j in range(20)}
    a = judge.answer("q", truth, ids, scores)
    assert a == SimulatedJudge(recall=0.5, false_yes_rate=0.25, seed=7).answer("q", truth, ids, scores)
    assert a != SimulatedJudge(recall=0.5, false_yes_rate=0.25, seed=8).answer("q", truth, ids, scores)
    # a pair's answer does not depend on the list's order (the percentile follows the scores, not the position)
    back = judge.answer("q", truth, ids[::-1], scores[::-1])
    assert back[::-1] == a
    yes, no = judge.logits(a)
    assert {(y, n) for y, n in zip(yes, no)} <= {(ANSWER_LOGIT, -ANSWER_LOGIT), (-ANSWER_LOGIT, ANSWER_LOGIT)}
    assert [y > n for y, n in zip(yes, no)] == a
    with pytest.raises(ValueError, match=r"judge.recall=1.5 must be within \[0, 1\]"):
        SimulatedJudge(recall=1.5)
    with pytest.raises(ValueError, match="false_yes_rate=0.6"):
        SimulatedJudge(false_yes_rate=0.6)


def test_refuses_data_without_ground_truth(tmp_path, tiny_embedder, monkeypatch):
    shards = _write_text(tmp_path, ground_truth=False, n=8)
    cur = importlib.import_module("mmembed.judge.curate")  # the module (the package exports a function of that name)
    monkeypatch.setattr(cur, "retrieve_candidates", lambda *a, **k: pytest.fail("retrieved before refusing"))
    with pytest.raises(NoGroundTruthError) as err:
        curate(tiny_embedder, SimulatedJudge(), shards, tmp_path / "out", k=4, max_negatives=2)
    msg = str(err.value)
    assert "\n" not in msg and SIMULATED_LABEL in msg and "false_negative_ids" in msg and "judge.model=<folder>" in msg


def test_same_files_as_the_mllm_path_and_the_cache_key(world, tiny_embedder, monkeypatch):
    tmp, shards = world
    cache = tmp / "cache"
    s = curate(tiny_embedder, SimulatedJudge(recall=0.9, seed=0), shards, tmp / "a", k=K, max_negatives=12,
               cache_dir=cache)
    header = json.loads((cache / JUDGMENTS_FILE).read_text().splitlines()[0])
    assert header["judge"] == SIMULATED_LABEL
    rows = _rows(tmp / "a")
    assert {r["judge"] for r in rows} == {SIMULATED_LABEL}
    keys = {"id", "dataset", "strategy", "n", "judge", "candidate_ids", "ranks", "scores", "positive_score", "yes",
            "no", "decisions", "negative_ids", "negative_ranks", "extra_positive_ids", "false_negative_ids"}
    assert all(set(r) == keys for r in rows)  # the fields an MLLM-judged manifest has (tests/test_curate.py)
    summary = json.loads((tmp / "a" / "summary.json").read_text())
    assert summary["judge"] == SIMULATED_LABEL and summary["totals"]["judged_yes"] == s.totals["judged_yes"]

    # same settings: the cached judgments are reused (no answers drawn); other settings: judged again
    monkeypatch.setattr(SimulatedJudge, "answer", lambda *a, **k: pytest.fail("judged again despite the cache"))
    again = curate(tiny_embedder, SimulatedJudge(recall=0.9, seed=0), shards, tmp / "b", k=K, max_negatives=12,
                   cache_dir=cache)
    assert _rows(tmp / "b") == rows and again.totals == s.totals
    monkeypatch.undo()
    low = curate(tiny_embedder, SimulatedJudge(recall=0.3, seed=0), shards, tmp / "c", k=K, max_negatives=12,
                 cache_dir=cache)
    assert low.totals["fn_caught"] < s.totals["fn_caught"]
    assert json.loads((cache / JUDGMENTS_FILE).read_text().splitlines()[0])["fingerprint"] != header["fingerprint"]


def test_margin_control_on_hand_made_scores(tmp_path):
    ids = ["a", "b", "c", "d", "e"]
    scores = [0.95, 0.81, 0.78, 0.60, 0.50]
    assert within_margin(scores, 0.80, 0.05) == [True, True, True, False, False]  # above, or within 0.05 below
    assert choose(ids, ["unjudged"] * 5, 2, "margin", scores=scores, positive_score=0.80, margin=0.05) == \
        (["d", "e"], [])
    assert choose(ids, ["no"] * 5, 9, "margin", scores=scores, positive_score=0.80, margin=0.0) == (["c", "d", "e"], [])
    with pytest.raises(ValueError, match="ground truth's score"):
        choose(ids, ["no"] * 5, 2, "margin", scores=scores)

    # write_curated over hand-made retrieval + judgments: negatives, the three strategies' false-negative counts
    shards = _write_text(tmp_path, n=10, fn=2)  # planted: toy/0000 -> p1, p2; toy/0001 -> p2, p3; toy/0002 -> p3, p4
    retrieval = {"k": 6, "queries": {"toy": [
        {"id": "toy/0000", "candidate_ids": ["toy/p1", "toy/p2", "toy/p5", "toy/p6", "toy/p7"],
         "ranks": [1, 2, 3, 4, 5], "scores": [0.9, 0.7, 0.69, 0.5, 0.4], "positive_score": 0.72},
        {"id": "toy/0001", "candidate_ids": ["toy/p8", "toy/p2", "toy/p9"], "ranks": [1, 3, 4],
         "scores": [0.6, 0.55, 0.1], "positive_score": 0.9},
        {"id": "toy/0002", "candidate_ids": ["toy/p5", "toy/p6"], "ranks": [2, 3], "scores": [0.3, 0.2],
         "positive_score": 0.31},
        *({"id": f"toy/{i:04d}", "candidate_ids": [], "ranks": [], "scores": [], "positive_score": 0.0}
          for i in range(3, 10))]}}
    yes, no = [ANSWER_LOGIT, -ANSWER_LOGIT], [-ANSWER_LOGIT, ANSWER_LOGIT]
    judgments = {"toy/0000": {"judged": True, "yes": [yes[0], yes[0], yes[1], yes[1], yes[1]],
                              "no": [no[0], no[0], no[1], no[1], no[1]]},
                 "toy/0001": {"judged": True, "yes": [yes[1]] * 3, "no": [no[1]] * 3},
                 "toy/0002": {"judged": True, "yes": [yes[1]] * 2, "no": [no[1]] * 2}}  # the rest: no judgments
    s = write_curated(shards, retrieval, judgments, tmp_path / "m", n=2, strategy="margin", margin=0.05)
    rows = {r["id"]: r for r in _rows(tmp_path / "m")}
    assert rows["toy/0000"]["negative_ids"] == ["toy/p6", "toy/p7"]  # p1 (above), p2 and p5 (within 0.05) dropped
    assert rows["toy/0001"]["negative_ids"] == ["toy/p8", "toy/p2"]  # nothing near the ground truth's 0.9
    assert rows["toy/0002"]["negative_ids"] == ["toy/p6"]  # p5 is 0.01 below the ground truth, p6 0.11
    assert all(r["extra_positive_ids"] == [] for r in rows.values())
    t = s.totals
    assert (s.strategy, s.margin, t["margin_dropped"], t["negatives"]) == ("margin", 0.05, 4, 5)
    assert (t["fn_retrieved"], t["fn_caught"]) == (3, 2)
    # false negatives left among the n = 2 negatives: rule p1, p2 | p2; judge (yes to p1, p2 of q0) p2; margin p2
    assert (t["fn_negative_rule"], t["fn_negative_judge"], t["fn_negative_margin"]) == (3, 1, 1)
    # without the ground truth's score (a cache from before it was recorded) the margin control refuses
    for row in retrieval["queries"]["toy"]:
        del row["positive_score"]
    with pytest.raises(ValueError, match="no positive_score"):
        write_curated(shards, retrieval, judgments, tmp_path / "m2", n=2, strategy="margin")
    assert write_curated(shards, retrieval, judgments, tmp_path / "r", n=2, strategy="rule").totals[
        "fn_negative_margin"] is None


def test_judge_labels_and_loading():
    assert judge_label("simulated") == SIMULATED_LABEL and judge_label("/models/qwen3-vl") == "MLLM judge"
    assert judge_label(None) is None
    j = load_judge("simulated", recall=0.8, false_yes_rate=0.1, seed=5)
    assert isinstance(j, SimulatedJudge) and (j.recall, j.false_yes_rate, j.seed) == (0.8, 0.1, 5)
    assert j.label == SIMULATED_LABEL and SIMULATED_LABEL in j.display_name and "recall 0.8" in j.display_name
    assert j.fingerprint != SimulatedJudge(recall=0.8, false_yes_rate=0.1, seed=6).fingerprint


def test_retrieval_records_the_ground_truth_score_and_refreshes_old_caches(world, tiny_embedder, tmp_path):
    import shutil

    from mmembed.judge.curate import RETRIEVAL_FILE, RETRIEVAL_FORMAT, retrieve_candidates

    src, shards = world
    shutil.copy(src / "cache" / RETRIEVAL_FILE, tmp_path / RETRIEVAL_FILE)
    cached = json.loads((tmp_path / RETRIEVAL_FILE).read_text())
    assert cached["fingerprint"].endswith(f"/{RETRIEVAL_FORMAT}")
    seen = set()
    for row in cached["queries"]["toy"]:
        pos, scores, ranks = row["positive_score"], row["scores"], row["ranks"]
        if len(ranks) == K - 1:  # the ground truth was retrieved at the one missing rank: its score sits there
            (gt_rank,) = set(range(1, K + 1)) - set(ranks)
            above = [s for s, r in zip(scores, ranks) if r < gt_rank]
            below = [s for s, r in zip(scores, ranks) if r > gt_rank]
            assert all(s >= pos - 1e-5 for s in above) and all(s <= pos + 1e-5 for s in below)
            seen.add("retrieved")
        else:  # not in the top K: below every candidate
            assert len(ranks) == K and pos <= min(scores) + 1e-5
            seen.add("not retrieved")
    assert seen == {"retrieved", "not retrieved"}
    # a cache written before positive_score existed (old fingerprint, no field) is recomputed, not read
    for row in cached["queries"]["toy"]:
        del row["positive_score"]
    cached["fingerprint"] = cached["fingerprint"].removesuffix(f"/{RETRIEVAL_FORMAT}")
    (tmp_path / RETRIEVAL_FILE).write_text(json.dumps(cached))
    fresh = retrieve_candidates(tiny_embedder, shards, tmp_path, k=K)
    assert all("positive_score" in r for r in fresh["queries"]["toy"])
