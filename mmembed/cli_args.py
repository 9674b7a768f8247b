"""Command-line options shared by the tools that load a model (``mmembed-eval``, the mining CLI, ...).

One home, so every tool spells ``--model / --vtc-factor / --device`` the same way and builds the Embedder the same
way. Light on purpose: building a parser imports no torch.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--vtc-factor``, ``--in-tower-layer`` and ``--device`` to ``parser``."""
    parser.add_argument("--model", required=True, help="preset name (e.g. tiny) or local model folder")
    parser.add_argument("--vtc-factor", type=int, default=None, help="override the model's compression factor")
    parser.add_argument("--in-tower-layer", default=None,
                        help="in-tower compression after vision block k (0..L), or 'off'; default: the folder's")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")


def check_device(device: Any, option: str = "--device") -> None:
    """Refuse a device this machine cannot use, with a one-line ``ValueError`` naming the fix.

    torch only finds out deep inside the first ``.to(device)`` (an ``AssertionError`` "Torch not compiled with CUDA
    enabled", or a RuntimeError), after the model has been built.
    """
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{option} {device!r} is not a device ({err}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise ValueError(f"{option} {device}: CUDA is not available here (torch {torch.__version__}, {built}); "
                             f"use {option} cpu or leave it out")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def embedder_from_args(args: argparse.Namespace, device: Any = None):
    """The ``mmembed.Embedder`` those options describe (``device`` overrides ``args.device``)."""
    from mmembed.embedder import Embedder

    device = device or args.device
    check_device(device)
    return Embedder.from_pretrained(args.model, vtc_factor=args.vtc_factor, device=device,
                                    in_tower_layer=getattr(args, "in_tower_layer", None))
