"""Smoke tests of the VTC benchmarks on the tiny preset: they run, print their ratio lines and count tokens right."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import bench_vtc_encode, bench_vtc_train
from benchmarks.common import Timings, analytic_gflops, benchmark_session, run_interleaved, vision_tile_gflops
from mmembed.backbone.model import load_processor
from mmembed.backbone.presets import PRESETS
from mmembed.backbone.vtc import tokens_per_tile

SMOKE = ["--preset", "tiny", "--reps", "1", "--warmup", "0"]
RATIO = re.compile(r"^RATIO (.+): VTC/native = (\d+\.\d+)x", re.MULTILINE)
# A document page is twice the tile side on each axis: 2 x 2 tiles plus the thumbnail.
DOC_TILES = 5


@pytest.fixture(scope="module")
def per_tile() -> dict[int, int]:
    _, config = load_processor("tiny", 1)
    return {s: tokens_per_tile(config, s) for s in (1, 2)}


def test_encode_smoke(capsys, per_tile):
    threads = torch.get_num_threads()
    res = bench_vtc_encode.main([*SMOKE, "--n", "2", "--batch-size", "2"])
    out = capsys.readouterr().out

    labels = dict(RATIO.findall(out))
    for kind in ("natural", "document"):
        assert f"{kind} encode items/s" in labels and f"{kind} model-only items/s" in labels
        assert re.search(rf"RATIO {kind} encode items/s: .*\(goal >= [\d.]+x: (met|NOT met)\)", out)
    for s in (1, 2):
        assert res["tokens"]["natural", s] == per_tile[s]
        assert res["tiles"]["document", s] == DOC_TILES
        assert res["tokens"]["document", s] == DOC_TILES * per_tile[s]
    assert "same weights: yes" in out
    assert torch.get_num_threads() == threads  # main() restores what it changed


def test_train_smoke(capsys, per_tile):
    res = bench_vtc_train.main([*SMOKE, "--batch-size", "2", "--memory", "inprocess"])
    out = capsys.readouterr().out

    labels = dict(RATIO.findall(out))
    for mix in ("mixed", "natural", "document"):
        assert f"{mix} train samples/s" in labels and float(labels[f"{mix} train samples/s"]) > 0
        assert re.search(rf"^MEMORY {mix}: worst-task step peak native/VTC = ", out, re.MULTILINE)
    # Visual tokens per sample, query + candidate: image queries cost one tile too.
    images_per_sample = {"T->I": 1, "I->I": 2, "IT->I": 2}
    for s in (1, 2):
        for task, n in images_per_sample.items():
            assert res["tokens"][task, s] == n * per_tile[s]
        assert res["tokens"]["T->VD", s] == DOC_TILES * per_tile[s]
    assert all("error" not in m and len(m["peaks"]) == 2 for m in res["memory"])


def test_mini_shape_selects_a_library_preset():
    with pytest.raises(SystemExit, match="only applies to --preset mini"):
        bench_vtc_encode.parse_args(["--preset", "tiny", "--mini-shape", "2b-proportional"])
    args = bench_vtc_encode.parse_args(["--mini-shape", "2b-proportional", "--threads", "1"])
    threads = torch.get_num_threads()
    with benchmark_session(args) as (name, device, _):
        assert name == "mini_2b_proportional" and name in PRESETS and device.type in ("cpu", "cuda")
        assert analytic_gflops(name)["vision_tile"] > analytic_gflops("mini")["vision_tile"]
    assert torch.get_num_threads() == threads


def test_interleaving_alternates_order_and_pairs_ratios():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    t = run_interleaved(fns, reps=3, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(t.seconds["a"]) == 3 and len(t.cpu_seconds["b"]) == 3
    # Paired: the ratio of each repetition's pair, then the median -- not the ratio of two medians.
    paired = Timings({"n": [2.0, 9.0, 4.0], "v": [1.0, 3.0, 1.0]}, {"n": [1.0] * 3, "v": [1.0] * 3})
    assert paired.ratio("n", "v") == 3.0 and paired.median("n") / paired.median("v") == 4.0


def test_train_weights_validation():
    with pytest.raises(SystemExit, match="weight 0"):
        bench_vtc_train.parse_args(["--mixes", "document", "--weights", "T->VD=0"])
    with pytest.raises(SystemExit, match="tasks must be among"):
        bench_vtc_train.parse_args(["--weights", "X->Y=1"])
    args = bench_vtc_train.parse_args(["--weights", "T->I=3,T->VD=1"])
    assert bench_vtc_train.mix_weights(args, "mixed") == {"T->I": 0.75, "T->VD": 0.25}


@pytest.mark.slow
def test_train_memory_in_fresh_processes(capsys):
    res = bench_vtc_train.main([*SMOKE, "--mixes", "document", "--batch-size", "2", "--memory", "subprocess"])
    assert all("error" not in m and m["peaks"][1] > 0 for m in res["memory"])
    assert "fresh process per row" in capsys.readouterr().out


def test_in_tower_variants_run_beside_native_and_vtc(capsys, per_tile):
    res = bench_vtc_encode.main([*SMOKE, "--n", "2", "--batch-size", "2", "--in-tower", "0,2"])
    out = capsys.readouterr().out
    for k in (0, 2):
        assert res["tokens"]["natural", f"2@{k}"] == per_tile[2]  # the LM gets VTC's token count
        assert res["tokens"]["document", f"2@{k}"] == DOC_TILES * per_tile[2]
        assert re.search(rf"^RATIO natural encode items/s, in-tower k={k}: .*\(goal >= 2x: (met|NOT met)\)", out,
                         re.MULTILINE)
        assert re.search(rf"^FLOPS natural encode, 2 \+ in-tower k={k}: achieved \d+\.\d+x of a \d+\.\d+x FLOP "
                         r"ratio = \d+% \(goal >= 85%: (met|NOT met)\) \[CPU time: ", out, re.MULTILINE)
    # Pooling after the last layer costs what VTC costs; pooling earlier costs less.
    assert res["flop_ratio"]["natural", "2@2"] == pytest.approx(res["flop_ratio"]["natural", 2])
    assert res["flop_ratio"]["natural", "2@0"] > res["flop_ratio"]["natural", 2] > 1
    assert "same weights: yes" in out
    with pytest.raises(SystemExit, match=r"block indices 0\.\.2"):
        bench_vtc_encode.parse_args([*SMOKE, "--in-tower", "3"])


def test_vision_flops_with_in_tower_pooling():
    full = vision_tile_gflops("internvl3_2b")
    assert full == pytest.approx(analytic_gflops("internvl3_2b")["vision_tile"])
    assert vision_tile_gflops("internvl3_2b", 2, 24) == pytest.approx(full)
    by_k = [vision_tile_gflops("internvl3_2b", 2, k) for k in (0, 6, 12, 18, 24)]
    assert by_k == sorted(by_k)
    # k = 0: every layer on 257 instead of 1025 tokens (linear part / 3.99, attention / 15.9), patch embedding kept.
    assert 0.2 < by_k[0] / full < 0.26
