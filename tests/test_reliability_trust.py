"""Trust boundaries: model folders load safetensors by name only (never a pickle), and the quickstart path makes
no network connection."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmembed import Embedder
from mmembed.backbone.model import load_config

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "experiments" / "run.py"


class _Marker:
    """Unpickling this touches a file: proof that a pickle was (not) loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _folder_with_pickle_weights(folder: Path, marker: Path) -> Path:
    folder.mkdir()
    load_config("tiny").save_pretrained(folder)
    save_file({"unrelated": torch.zeros(2)}, folder / "foo.safetensors")  # passes a '*.safetensors' glob
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": _Marker(str(marker))}, f)
    return folder


def test_a_folder_without_model_safetensors_is_refused_and_no_pickle_is_opened(tmp_path):
    marker = tmp_path / "unpickled"
    folder = _folder_with_pickle_weights(tmp_path / "ckpt", marker)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json") as info:
        Embedder.from_pretrained(folder)
    assert "\n" not in str(info.value) and "pytorch_model.bin" in str(info.value)
    assert not marker.exists()


def test_the_model_loader_never_lets_transformers_fall_back_to_pickle(tmp_path):
    """Past the folder check, ``from_pretrained`` itself is told to use safetensors: a complete, valid
    ``pytorch_model.bin`` (which stock transformers would load) is not read."""
    from transformers import InternVLForConditionalGeneration

    from mmembed.backbone.model import _load_model

    config = load_config("tiny")
    config.save_pretrained(tmp_path)
    torch.save(InternVLForConditionalGeneration(config).state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        _load_model(tmp_path, config, False, None, 0)


_BLOCK_SOCKETS = '''
import os, socket
_LOG = os.environ["MMEMBED_SOCKET_LOG"]

def _refuse(what, address):
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {what} {address!r}\\n")
    raise OSError(f"network blocked by the test: {what} {address!r}")

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex

def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse("connect", address)
    return _connect(self, address)

def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse("connect_ex", address)
    return _connect_ex(self, address)

socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.create_connection = lambda address, *a, **k: _refuse("create_connection", address)
socket.getaddrinfo = lambda host, *a, **k: _refuse("getaddrinfo", host)  # DNS, as well as connect
socket.gethostbyname = lambda host, *a, **k: _refuse("gethostbyname", host)
socket.gethostbyname_ex = lambda host, *a, **k: _refuse("gethostbyname_ex", host)
'''

# Pretend the CPU has AVX512-BF16, the case where bitsandbytes' CPU backend asks the hub for a kernel when it is
# imported: its decision is `bitsandbytes.functional.has_avx512bf16()` (the native library's CPU probe), read by
# `bitsandbytes/backends/cpu/ops.py` at import. Patched right after `bitsandbytes.functional` executes.
_FAKE_AVX512_BF16 = '''
import importlib.abc, importlib.machinery, sys

class _FakeBF16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _FakeBF16())
'''


def _blocked_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose Python refuses (and logs) every connect and DNS lookup, on a pretend AVX512-BF16 CPU."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCK_SOCKETS + _FAKE_AVX512_BF16)
    log = tmp_path / "sockets.log"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(MMEMBED_ROOT=str(tmp_path), OMP_NUM_THREADS="1", MMEMBED_SOCKET_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env, log


@pytest.mark.slow  # three interpreters importing torch (~20 s each on a shared 2-core box)
def test_importing_bitsandbytes_after_mmembed_makes_no_hub_lookup_on_an_avx512_bf16_cpu(tmp_path):
    env, log = _blocked_env(tmp_path)
    code = ("import mmembed, bitsandbytes, sys\n"
            "from bitsandbytes.backends.cpu import ops\n"
            "assert ops.has_avx512bf16() is True  # the simulated CPU takes the hub branch\n"
            "assert ops.gemm_4bit_forward_kernel is None  # bitsandbytes' own native kernel instead\n"
            "import kernels  # restored afterwards: transformers' opt-in use of `kernels` still works\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    assert not log.exists(), log.read_text()  # no DNS lookup, no connect
    # the simulation is real: without mmembed imported first, the same import looks the hub up (DNS, logged)
    probe = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert "'huggingface.co'" in log.read_text()
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.gethostbyname('example.org')"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "gethostbyname 'example.org'" in log.read_text()


@pytest.mark.slow
def test_quickstart_path_makes_no_connection_attempt(tmp_path):
    """The quickstart (tiny model, ci world, a few steps, per-epoch evaluation, MLflow) with sockets blocked."""
    env, log = _blocked_env(tmp_path)  # sockets and DNS blocked, AVX512-BF16 simulated
    env["OMP_NUM_THREADS"] = "2"
    args = ["+exp=quickstart", "synth.size=ci", "trainer.max_steps=4", "data.samples_per_epoch=32",
            "data.batch_size=4", "data.num_workers=0", f"hydra.run.dir={tmp_path}/run"]
    r = subprocess.run([sys.executable, str(RUN), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert (tmp_path / "run" / "embedder" / "model.safetensors").is_file()
    assert (tmp_path / "logs" / "mlflow.db").is_file()
    assert not log.exists(), log.read_text()  # not a single connect / DNS lookup was attempted (peft -> bnb too)
    # the hook itself works (a connection attempt in the same environment is refused and logged)
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "network blocked by the test" in probe.stderr and log.exists()


@pytest.mark.slow
def test_resuming_from_a_malicious_checkpoint_runs_no_code_even_when_torch_is_told_to_allow_it(tmp_path):
    """``ckpt_path`` is loaded weights-only although ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` asks torch not to."""
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Marker(str(marker))}, ckpt)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(MMEMBED_ROOT=str(tmp_path), OMP_NUM_THREADS="2", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    args = ["+exp=quickstart", "synth.size=ci", "trainer.max_steps=2", "data.samples_per_epoch=8", "data.batch_size=4",
            "data.num_workers=0", f"hydra.run.dir={tmp_path}/run", f"ckpt_path={ckpt}"]
    r = subprocess.run([sys.executable, str(RUN), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode != 0 and not marker.exists(), (r.stdout[-2000:], r.stderr[-3000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_the_kits_own_torch_loads_stay_weights_only_under_the_force_env_var(tmp_path, monkeypatch):
    from mmembed.callbacks.resume import saved_mlflow_run_id

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"callbacks": {}, "payload": _Marker(str(marker))}, evil)
    with pytest.warns(UserWarning, match="could not read the MLflow run id"):
        assert saved_mlflow_run_id(evil) is None
    assert not marker.exists()
