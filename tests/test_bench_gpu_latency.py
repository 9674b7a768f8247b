"""The GPU latency benchmark runs end to end on CPU with the tiny preset and counts tokens and FLOPs right."""

from __future__ import annotations

import json
import re

import pytest
import torch

from benchmarks import bench_gpu_latency as bench
from mmembed.backbone.model import load_processor
from mmembed.backbone.vtc import tokens_per_tile

ARGS = ["--presets", "tiny", "--device", "cpu", "--latency-reps", "2", "--warmup", "1", "--batch-size", "3",
        "--throughput-reps", "1", "--train-batch", "2", "--train-steps", "1", "--sort-by-length"]


def test_tiny_on_cpu_reports_every_figure(capsys, tmp_path):
    threads = torch.get_num_threads()
    res = bench.main([*ARGS, "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads
    inf = res["presets"]["tiny"]["inference"]
    _, config = load_processor("tiny", 1)
    per_tile = {s: tokens_per_tile(config, s) for s in (1, 2)}
    for kind in bench.KINDS:
        tiles = inf["tiles"][kind, 2]
        assert tiles == inf["tiles"][kind, 1] == {"visdoc_query": 0, "visdoc_candidate": 5}.get(kind, 1)
        # Same text, so the sequences differ by exactly the visual tokens VTC removes.
        assert inf["tokens"][kind, 1] - inf["tokens"][kind, 2] == tiles * (per_tile[1] - per_tile[2])
        assert (inf["gflops"][kind, 2] < inf["gflops"][kind, 1]) == (tiles > 0)
        for s in (1, 2):
            assert inf["latency_ms"][kind, s] > 0 and inf["items_s"][kind, s] > 0
        assert re.search(rf"^RATIO tiny {kind} batch-1 latency: native/VTC = \d+\.\d+x", out, re.MULTILINE)
    assert set(inf["sorted_items_s"]) == {1, 2} and "SORT tiny s=2" in out
    train = res["presets"]["tiny"]["training"]
    assert train[2]["batch"] == train[1]["batch"] == 2 and train[2]["samples_s"] > 0  # CPU: capped, no doubling
    assert "RATIO tiny training samples/s" in out
    proj = res["presets"]["tiny"]["projection"]
    assert proj[2]["mmeb_min"] > 0 and proj[2]["visdoc_min"] > 0 and "PROJECTION tiny s=2" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["presets"]["tiny"]["inference"]["tokens"]["visdoc_candidate|2"] == inf["tokens"]["visdoc_candidate", 2]


def test_flops_per_item_follow_the_config():
    # 2B at s=2: one 448px tile = InternViT-300M on 1025 patches; the LLM term is ~2 x 1.5B params per token.
    one_token = bench.item_gflops("internvl3_2b", 2, tiles=0, seq_len=1)
    assert 2.5 < one_token < 3.5
    tile = bench.item_gflops("internvl3_2b", 2, tiles=1, seq_len=0)
    assert 500 < tile < 800  # ~0.3B params x 2 x 1025 patches, plus attention and the projector
    # The native projector sees 4x the tokens of s=2.
    assert bench.item_gflops("internvl3_2b", 1, tiles=1, seq_len=0) > tile


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--latency-reps must be >= 1"):
        bench.parse_args(["--latency-reps", "0"])
    (tmp_path / "c.json").write_text('{"mmeb_querys": 1}')
    with pytest.raises(SystemExit, match="unknown kinds"):
        bench.eval_item_counts(str(tmp_path / "c.json"))


def test_in_tower_variant_is_measured_beside_native_and_vtc(capsys):
    res = bench.main([*ARGS, "--in-tower", "1"])
    out = capsys.readouterr().out
    inf = res["presets"]["tiny"]["inference"]
    for kind in bench.KINDS:
        assert inf["tokens"][kind, "2@1"] == inf["tokens"][kind, 2]  # the LLM gets VTC's tokens
        assert (inf["gflops"][kind, "2@1"] < inf["gflops"][kind, 2]) == (inf["tiles"][kind, 2] > 0)
        assert re.search(rf"^RATIO tiny {kind} batch-1 latency, 2 \+ in-tower k=1: native/variant = \d+\.\d+x", out,
                         re.MULTILINE)
    assert res["presets"]["tiny"]["training"]["2@1"]["samples_s"] > 0
    assert "RATIO tiny training samples/s at the largest batch, 2 + in-tower k=1" in out
