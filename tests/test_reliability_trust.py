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
socket.getaddrinfo = lambda host, *a, **k: _refuse("getaddrinfo", host)
'''


@pytest.mark.slow
def test_quickstart_path_makes_no_connection_attempt(tmp_path):
    """The quickstart (tiny model, ci world, a few steps, per-epoch evaluation, MLflow) with sockets blocked."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCK_SOCKETS)
    log = tmp_path / "sockets.log"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(MMEMBED_ROOT=str(tmp_path), OMP_NUM_THREADS="2", MMEMBED_SOCKET_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    args = ["+exp=quickstart", "synth.size=ci", "trainer.max_steps=4", "data.samples_per_epoch=32",
            "data.batch_size=4", "data.num_workers=0", f"hydra.run.dir={tmp_path}/run"]
    r = subprocess.run([sys.executable, str(RUN), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert (tmp_path / "run" / "embedder" / "model.safetensors").is_file()
    assert (tmp_path / "logs" / "mlflow.db").is_file()
    assert not log.exists(), log.read_text()  # not a single connect / DNS lookup was attempted
    # the hook itself works (a connection attempt in the same environment is refused and logged)
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "network blocked by the test" in probe.stderr and log.exists()
