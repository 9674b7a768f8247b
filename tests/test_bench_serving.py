"""Smoke runs of the serving benchmarks (length-sorted encode, index recall, server load) at tiny sizes."""

from __future__ import annotations

import re

import pytest

from benchmarks import bench_index_recall, bench_length_sort, bench_serve_load


def test_length_sort_smoke(capsys):
    res = bench_length_sort.main(["--preset", "tiny", "--n", "9", "--batch-size", "3", "--reps", "1",
                                  "--warmup", "0"])
    out = capsys.readouterr().out
    assert re.search(r"^RATIO length-sorted / input-order encode items/s = \d+\.\d+x", out, re.MULTILINE)
    real, unsorted_tokens, sorted_tokens = res["tokens"]
    assert real == sum(res["lengths"]) and real <= sorted_tokens <= unsorted_tokens
    assert res["max_diff"] < 1e-4  # batching order changes only padding, not the embeddings


def test_padded_tokens_counts_batches():
    assert bench_length_sort.padded_tokens([1, 5, 2, 6], [0, 1, 2, 3], 2) == (14, 10 + 12)
    assert bench_length_sort.padded_tokens([1, 5, 2, 6], [0, 2, 1, 3], 2) == (14, 4 + 12)


def test_index_recall_smoke(capsys):
    pytest.importorskip("faiss")
    res = bench_index_recall.main(["--n", "600", "--dim", "16", "--clusters", "20", "--queries", "20"])
    out = capsys.readouterr().out
    for kind in ("ivf", "hnsw"):
        assert re.search(rf"^RECALL {kind} recall@10 vs exact = [01]\.\d{{4}}", out, re.MULTILINE)
    assert all(0.0 <= r <= 1.0 for r in res.values()) and max(res.values()) > 0.9


def test_percentile_is_nearest_rank():
    xs = [float(i) for i in range(1, 101)]
    assert bench_serve_load.percentile(xs, 50) == 50.0 and bench_serve_load.percentile(xs, 99) == 99.0
    assert bench_serve_load.percentile([3.0], 99) == 3.0


@pytest.mark.slow
def test_serve_load_smoke(capsys):
    pytest.importorskip("litserve")
    res = bench_serve_load.main(["--model", "tiny", "--requests", "8", "--concurrency", "2",
                                 "--max-batch-size", "4"])
    out = capsys.readouterr().out
    assert "RATIO throughput dynamic batching" in out
    assert set(res["results"]) == {4, 1} and all(r["p99_ms"] >= r["p50_ms"] > 0 for r in res["results"].values())
