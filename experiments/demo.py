"""A short demo of the public Embedder API on generated images (no weights, no data needed).

Run: ``make demo`` (or ``python experiments/demo.py [--preset tiny|mini] [--vtc-factor 2]``).
"""

from __future__ import annotations

import argparse
import time

from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from mmembed import Embedder, Item
from mmembed.prompts.embedding import instructions_for


def scene(color: str, shape: str, size: int = 448) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    box = [size // 4, size // 4, 3 * size // 4, 3 * size // 4]
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=color)
    return img


def page(lines: int = 40) -> Image.Image:
    img = Image.new("RGB", (896, 1152), "white")
    d = ImageDraw.Draw(img)
    for i in range(lines):
        d.text((40, 30 + i * 27), f"Line {i}: quarterly revenue grew by {i * 3 % 17} percent.", fill="black")
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vtc-factor", type=int, default=2)
    args = ap.parse_args()
    console = Console()
    t0 = time.perf_counter()
    emb = Embedder.from_pretrained(args.preset, vtc_factor=args.vtc_factor)
    dt = time.perf_counter() - t0
    console.print(f"built '{args.preset}' (random init, vtc_factor={args.vtc_factor}) in {dt:.1f}s")
    inst, img_inst = instructions_for("MSCOCO_t2i")  # the paper's Table 11 instructions
    queries = [Item(text=f"a {c} {s}", instruction=inst) for c, s in [("red", "circle"), ("blue", "square")]]
    cands = [Item(image=scene(c, s), instruction=img_inst)
             for c, s in [("red", "circle"), ("blue", "square"), ("green", "circle")]]
    doc = Item(image=page(), kind="document", instruction=instructions_for("ColPali")[1])
    q = emb.encode(queries, role="query")
    c = emb.encode(cands + [doc], role="candidate")
    table = Table(title="cosine similarity (random weights: values are not meaningful yet)")
    table.add_column("query")
    for name in ["red circle", "blue square", "green circle", "document"]:
        table.add_column(name)
    for qi, item in enumerate(queries):
        table.add_row(item.text, *[f"{v:.3f}" for v in (q[qi] @ c.T).tolist()])
    console.print(table)
    console.print(f"visual tokens: natural image {emb.num_visual_tokens(cands[0])}, "
                  f"document page {emb.num_visual_tokens(doc)}; embedding dim {emb.embed_dim}")


if __name__ == "__main__":
    main()
