"""``mmembed-eval --devices 2`` (2 gloo processes) writes the run files and scores of a one-process evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmembed.eval.cli import main
from mmembed.eval.results import load_metrics
from tests.test_eval_runners import mmeb_data, visdoc_data  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _args(benchmark: str, data: Path, out: Path, devices: int) -> list[str]:
    return [benchmark, "--model", "tiny", "--data", str(data), "--out", str(out), "--device", "cpu", "--batch-size",
            "2", "--devices", str(devices)]


def _eval_one_process(benchmark: str, data: Path, out: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same kernels reduce in the same order, so equality is to the bit
    try:
        assert main(_args(benchmark, data, out, 1)) == 0
    finally:
        torch.set_num_threads(threads)


def _eval_two_processes(benchmark: str, data: Path, out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "mmembed.eval.cli", *_args(benchmark, data, out, 2)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("overall") == 1  # rank 0 alone prints the table


def _run_files(out: Path) -> dict[str, bytes]:
    # Everything but metrics.json (it records timings) and the plot.
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "metrics.json" and p.suffix != ".png"}


def _scores(out: Path) -> dict:
    m = load_metrics(out)
    return {"overall": m["overall"], "sets": {n: s["score"] for n, s in m["sets"].items()}}


@pytest.mark.e2e
@pytest.mark.parametrize("benchmark", ["mmeb", "visdoc"])
def test_two_processes_write_the_single_process_files(benchmark, mmeb_data, visdoc_data, tmp_path):  # noqa: F811
    data = mmeb_data[0] if benchmark == "mmeb" else visdoc_data[0].parent
    _eval_one_process(benchmark, data, tmp_path / "one")
    _eval_two_processes(benchmark, data, tmp_path / "two")
    one, two = _run_files(tmp_path / "one"), _run_files(tmp_path / "two")
    assert one and one.keys() == two.keys()
    assert one == two
    assert _scores(tmp_path / "one") == _scores(tmp_path / "two")
    assert load_metrics(tmp_path / "two")["extra"]["devices"] == 2


def test_devices_flag_validation(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["mmeb", "--model", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--devices", "0"])
    assert "--devices must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["mmeb", "--model", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--devices", "2",
              "--reranker", "tiny"])
    assert "run E+R (--reranker) with --devices 1" in capsys.readouterr().err


@pytest.mark.e2e
def test_eval_callbacks_under_ddp_write_the_single_process_files(mmeb_data, visdoc_data, tmp_path):  # noqa: F811
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = ROOT / "tests" / "scripts" / "ddp_eval_callback.py"
    for mode in ("single", "ddp"):
        r = subprocess.run([sys.executable, str(script), str(tmp_path), mode, str(mmeb_data[0]),
                            str(visdoc_data[0].parent)], env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
    single, ddp = _run_files(tmp_path / "single"), _run_files(tmp_path / "ddp")
    assert single and single.keys() == ddp.keys()
    assert {Path(k).parts[1] for k in single} == {"mmeb", "visdoc"}
    assert single == ddp
    logged = {m: json.loads((tmp_path / f"{m}.json").read_text()) for m in ("single", "ddp")}
    assert logged["single"] == logged["ddp"] and logged["single"]["mmeb"][0]["metrics"]["val/mmeb/overall"] >= 0
    for bench in ("mmeb", "visdoc"):
        (folder,) = (tmp_path / "ddp").glob(f"step*-start/{bench}")
        assert load_metrics(folder)["extra"]["devices"] == 2
