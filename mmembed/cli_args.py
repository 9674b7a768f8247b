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


def embedder_from_args(args: argparse.Namespace, device: Any = None):
    """The ``mmembed.Embedder`` those options describe (``device`` overrides ``args.device``)."""
    from mmembed.embedder import Embedder

    return Embedder.from_pretrained(args.model, vtc_factor=args.vtc_factor, device=device or args.device,
                                    in_tower_layer=getattr(args, "in_tower_layer", None))
