"""Command-line errors end with one clear line (``--debug`` / ``HYDRA_FULL_ERROR=1`` show the trace), configs are
type-checked before any data is generated, and an unreachable MLflow server fails in seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmembed.data.writing import write_shards
from mmembed.eval import cli as eval_cli
from mmembed.mining import cli as mining_cli
from tests.fixtures_data import text_sample

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "experiments" / "run.py"


def _one_error_line(err: str, prefix: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert lines and lines[-1].startswith(prefix), err[-3000:]
    return lines[-1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_eval_cli_errors_are_one_line_and_debug_shows_the_trace(tmp_path, capsys):
    cases = [
        (["mmeb", "--model", "tiny", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
         "--data"),
        (["visdoc", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path), "--out", str(tmp_path / "o")],
         "no such checkpoint folder"),
        (["mmeb", "--model", "tinyy", "--data", str(tmp_path), "--out", str(tmp_path / "o")], "unknown preset"),
    ]
    for argv, message in cases:
        assert eval_cli.main(argv) == 2
        line = _one_error_line(capsys.readouterr().err, "mmembed-eval: error:")
        assert message in line and "--debug shows the traceback" in line
    with pytest.raises(FileNotFoundError):
        eval_cli.main([*cases[0][0], "--debug"])


def test_mining_cli_errors_are_one_line(tmp_path, capsys):
    shards = write_shards((text_sample(i) for i in range(2)), str(tmp_path / "s" / "toy-%06d.tar"))
    cases = [
        (["--model", "tiny", "--shards", str(tmp_path / "none-*.tar"), "--out", str(tmp_path / "o")],
         "no shards match"),
        (["--model", str(tmp_path / "no-model"), "--shards", shards[0], "--out", str(tmp_path / "o")],
         "no such checkpoint folder"),
    ]
    for argv, message in cases:
        assert mining_cli.main(argv) == 2
        line = _one_error_line(capsys.readouterr().err, "python -m mmembed.mining.cli: error:")
        assert message in line
    with pytest.raises(FileNotFoundError):
        mining_cli.main([*cases[0][0], "--debug"])


def _run(tmp_path: Path, args: list[str], timeout: int = 300, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(MMEMBED_ROOT=str(tmp_path), OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([sys.executable, str(RUN), *args, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_wrong_typed_overrides_are_refused_at_composition_before_any_data(tmp_path):
    for override, key in (("trainer.max_steps=abc", "trainer.max_steps='abc'"), ("seed=x", "seed='x'"),
                          ("data.batch_size=many", "data.batch_size='many'")):
        r = _run(tmp_path, [override])
        assert r.returncode == 2
        line = _one_error_line(r.stderr, "config error:")
        assert key in line and "not a valid int" in line
    assert not (tmp_path / "data").exists()  # refused before the synthetic world is generated


@pytest.mark.e2e
def test_config_errors_are_one_line_before_any_data_work(tmp_path):
    """An unknown key (Hydra's own multi-line report before) and a value that used to fail after the world was
    generated (negative learning rate) both end in one line, exit status 2, with no data written."""
    for args, expect in ((["trainer.max_step=3"], "Could not override 'trainer.max_step'"),
                         (["module.optimizer.lr=-1"], "module.optimizer.lr=-1 must be a positive number")):
        r = _run(tmp_path, args)
        assert r.returncode == 2, r.stderr[-2000:]
        assert expect in _one_error_line(r.stderr, "config error:")
        if args == ["trainer.max_step=3"]:
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # not Hydra's multi-line report
    assert not (tmp_path / "data").exists()


def test_unreachable_mlflow_server_fails_fast_with_one_line(tmp_path):
    port = _closed_port()
    start = time.perf_counter()
    r = _run(tmp_path, ["logger=mlflow_server", f"logger.tracking_uri=http://127.0.0.1:{port}"])
    elapsed = time.perf_counter() - start
    assert r.returncode == 2
    line = _one_error_line(r.stderr, "config error:")
    assert f"http://127.0.0.1:{port} is not reachable" in line and "logger=mlflow" in line
    assert not (tmp_path / "data").exists()
    assert elapsed < 60  # MLflow's own retries take minutes


def test_check_server_library_call(tmp_path):
    from mmembed.tracking import check_server, make_mlflow_logger

    port = _closed_port()
    with pytest.raises(ConnectionError, match="not reachable"):
        check_server(f"http://127.0.0.1:{port}", timeout=1)
    check_server(f"sqlite:///{tmp_path}/x.db")  # local stores are not probed
    with pytest.raises(ConnectionError, match="not reachable"):
        make_mlflow_logger(tracking_uri=f"http://127.0.0.1:{port}", output_dir=tmp_path)


SHORT = ["callbacks=none", "logger=none", "data.num_workers=0", "trainer.max_steps=1", "save_embedder=false"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty_glob", "too_few_samples"])
def test_run_time_failures_are_one_line_and_hydra_full_error_shows_the_trace(tmp_path, case):
    if case == "empty_glob":
        args = ["data=shards", f"data.train_shards={tmp_path}/none/*.tar", *SHORT]
        message = "no shards match"
    else:
        write_shards((text_sample(i) for i in range(4)), str(tmp_path / "s" / "toy-%06d.tar"))
        args = ["data=shards", f"data.train_shards={tmp_path}/s/*.tar", "data.samples_per_epoch=1",
                "data.batch_size=4", *SHORT]
        message = "samples_per_epoch=1 gives no batch"
    r = _run(tmp_path, args)
    assert r.returncode == 1
    line = _one_error_line(r.stderr, "error:")
    assert message in line and "HYDRA_FULL_ERROR=1" in line
    full = _run(tmp_path, args, HYDRA_FULL_ERROR="1")
    assert full.returncode != 0 and "Traceback" in full.stderr and message in full.stderr


def test_more_cli_mistakes_are_one_line(tmp_path, capsys):
    """``--device cuda`` without CUDA, unknown ``--sets``, ``synth --out <a file>``, ``--reranker <missing>``."""
    import torch

    from mmembed.data import cli as data_cli
    from mmembed.serve import cli as serve_cli
    from tests.fixtures_data import write_beir

    beir = write_beir(tmp_path / "vd" / "setA")
    if not torch.cuda.is_available():
        argv = ["visdoc", "--model", "tiny", "--device", "cuda", "--data", str(beir), "--out", str(tmp_path / "o")]
        assert eval_cli.main(argv) == 2
        assert "CUDA is not available here" in _one_error_line(capsys.readouterr().err, "mmembed-eval: error:")
        judge = ["judge", "--judge", "tiny", "--device", "cuda", "--data", str(tmp_path / "j.json"), "--out",
                 str(tmp_path / "o")]
        (tmp_path / "j.json").write_text("[]")
        assert eval_cli.main(judge) == 2
        assert "use --device cpu" in _one_error_line(capsys.readouterr().err, "mmembed-eval: error:")
    assert eval_cli.main(["visdoc", "--model", "tiny", "--device", "nonsense", "--data", str(beir), "--out",
                          str(tmp_path / "o")]) == 2
    assert "is not a device" in _one_error_line(capsys.readouterr().err, "mmembed-eval: error:")
    argv = ["visdoc", "--model", "tiny", "--sets", "setA,nope", "--data", str(tmp_path / "vd"), "--out",
            str(tmp_path / "o")]
    assert eval_cli.main(argv) == 2
    assert "--sets: ['nope'] not in" in _one_error_line(capsys.readouterr().err, "mmembed-eval: error:")
    # the runner itself refuses unknown names with a ValueError too (not a KeyError traceback)
    from mmembed.eval.visdoc import evaluate_visdoc

    with pytest.raises(ValueError, match=r"sets \['nope'\] are not in the data"):
        evaluate_visdoc(None, tmp_path / "vd", names=["nope"])

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert data_cli.main(["synth", "--out", str(a_file), "--size", "ci", "--workers", "1"]) == 2
    assert "is a file; give a folder" in _one_error_line(capsys.readouterr().err, "mmembed-data: error:")
    assert a_file.read_text() == "x"

    with pytest.raises(SystemExit) as info:
        serve_cli.main(["--model", "tiny", "--device", "cpu", "--reranker", str(tmp_path / "missing")])
    message = str(info.value.code)
    assert message.startswith("mmembed-serve:") and "no such checkpoint folder" in message and "\n" not in message
