"""Peak memory of ``mmembed-serve`` under image-heavy requests (issue 25: bounded server memory).

Starts the real server (``mmembed.serve.local.LocalServer``, default limits unless overridden) and, for each request
kind, resets the kernel's peak-RSS counter (``VmHWM``) of every server process, sends the request and reads the
peaks back. The figure printed is the *sum over the server's processes* of their peak resident memory (the launcher,
the HTTP process and the model worker): an upper bound of the server's simultaneous peak.

Requests (all PNGs of 4096x4096 that compress to a few kB each, so the body stays small):

* ``flood``: 32 images in one request (0.7 MB of body in the issue's probe; took the server to 18.6 GB before the
  per-request pixel budget) -- now a 413 answered from the image headers;
* ``largest``: as many 4096x4096 images as the per-request budget admits (2 by default) -- decoded and encoded;
* ``parallel``: ``--parallel`` copies of ``largest`` at once (the in-flight budget makes them take turns).

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_server_memory                  # tiny preset, default limits
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

GIB = 2**30


def png_b64(side: int = 4096, seed: int = 0) -> str:
    """A ``side`` x ``side`` RGB PNG with a little structure (so decoding does real work), base64-encoded."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (side, side), (250, 250, 250))
    d = ImageDraw.Draw(img)
    for i in range(8):
        o = (seed * 37 + i * side // 9) % side
        d.rectangle([o, o // 2, min(side - 1, o + side // 8), min(side - 1, o // 2 + side // 5)],
                    fill=(40 * i % 255, 90, 200 - 20 * i))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peaks(pids: list[int]) -> None:
    """Restart every process's ``VmHWM`` at its current RSS (``/proc/PID/clear_refs`` value 5)."""
    for p in pids:
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            pass


def peak_bytes(pids: list[int]) -> int:
    """Sum of the processes' peak resident sets since the last :func:`reset_peaks`."""
    return sum(_status_kb(p, "VmHWM") for p in pids) * 1024


def rss_bytes(pids: list[int]) -> int:
    return sum(_status_kb(p, "VmRSS") for p in pids) * 1024


def measure(model: str = "tiny", server_args: list[str] | None = None, parallel: int = 2,
            log_path: str | os.PathLike | None = None) -> dict[str, dict]:
    """Serve ``model`` and measure each request kind; returns ``{kind: {status, code, peak_gib, seconds}}``."""
    import requests

    from mmembed.serve.local import LocalServer
    from mmembed.serve.protocol import Limits

    limits = Limits()
    args = ["--device", "cpu", "--threads", "1", *(server_args or [])]
    per_request = limits.max_request_pixels // (4096 * 4096)
    if "--max-request-pixels" in args:
        per_request = int(args[args.index("--max-request-pixels") + 1]) // (4096 * 4096)
    image = png_b64()
    flood = {"input": [{"image": image} for _ in range(32)]}
    largest = {"input": [{"image": png_b64(seed=i + 1), "text": f"page {i}"} for i in range(max(1, per_request))]}
    out: dict[str, dict] = {}
    with LocalServer(model, args, log_path=log_path) as srv:
        pids = tree(srv.proc.pid)
        out["idle"] = {"rss_gib": rss_bytes(pids) / GIB}
        for kind, payloads in (("flood", [flood]), ("largest", [largest]), ("parallel", [largest] * parallel)):
            reset_peaks(pids)
            start = time.perf_counter()
            with ThreadPoolExecutor(len(payloads)) as pool:
                answers = list(pool.map(lambda p: requests.post(srv.url + "/v1/embeddings", json=p, timeout=600),
                                        payloads))
            codes = sorted({r.status_code for r in answers})
            errors = sorted({r.json().get("error", {}).get("code") for r in answers if r.status_code != 200})
            out[kind] = {"status": codes, "errors": errors, "peak_gib": peak_bytes(pids) / GIB,
                         "seconds": time.perf_counter() - start, "body_mb": len(str(payloads[0])) / 2**20,
                         "images": len(payloads[0]["input"]) * len(payloads)}
    return out


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--parallel", type=int, default=2, help="concurrent copies of the largest admitted request")
    p.add_argument("server_args", nargs="*", help="extra mmembed-serve arguments (after --)")
    args = p.parse_args(argv)
    res = measure(args.model, args.server_args, args.parallel)
    print(f"server idle: {res['idle']['rss_gib']:.2f} GiB resident (sum over its processes)")
    for kind in ("flood", "largest", "parallel"):
        r = res[kind]
        print(f"{kind:9s} {r['images']:3d} images of 4096x4096, body {r['body_mb']:.2f} MB -> HTTP {r['status']} "
              f"{r['errors'] or ''} in {r['seconds']:.1f}s; peak {r['peak_gib']:.2f} GiB (sum of per-process peaks)")
    return res


if __name__ == "__main__":
    main()
