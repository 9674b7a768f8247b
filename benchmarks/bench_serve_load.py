"""A bounded local load test of ``mmembed-serve``: dynamic batching vs batch size 1 (issue 14).

For each setting the script starts the real server on a free 127.0.0.1 port (``mmembed.serve.local.LocalServer``),
sends a few warm-up requests, then ``--requests`` requests from ``--concurrency`` client threads (each request one
input: mostly texts of varied length, every fourth a small natural image as base64), and prints the p50 / p99
latency and the throughput; then the throughput ratio. Nothing leaves the loopback interface.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_serve_load                          # mini preset, 200 requests, 8 clients
    .venv/bin/python -m benchmarks.bench_serve_load --model tiny --requests 40
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mini", help="preset or model folder to serve")
    p.add_argument("--requests", type=int, default=200, help="timed requests per setting")
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--max-batch-size", type=int, default=8, help="dynamic batching setting compared with 1")
    p.add_argument("--batch-timeout", type=float, default=0.01, help="seconds the server waits to fill a batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server's worker")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="keep the servers' logs here")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.max_batch_size < 2:
        raise SystemExit("--requests and --concurrency must be >= 1 and --max-batch-size >= 2")
    return args


def payloads(n: int, seed: int) -> list[dict]:
    """``n`` single-input requests: texts of varied length, every fourth a 96x96 scene as base64 PNG."""
    from mmembed.data.synth import scenes

    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = scenes.random_scene(rng)
        if i % 4 == 3:
            buf = io.BytesIO()
            scenes.render(scene, side=96).save(buf, format="PNG")
            item = {"image": base64.b64encode(buf.getvalue()).decode(), "instruction": "Represent the given image."}
        else:
            item = {"text": scenes.long_caption(scene) if i % 2 else scenes.short_caption(scene, scene.objects[0])}
        out.append({"model": "bench", "input": [item], "role": "query"})
    return out


def run_load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[float], float]:
    """Send all bodies with ``concurrency`` threads; returns per-request latencies (s) and the wall time (s)."""
    import requests

    sessions = [requests.Session() for _ in range(concurrency)]

    def one(i: int) -> float:
        t0 = time.perf_counter()
        r = sessions[i % concurrency].post(url + "/v1/embeddings", json=bodies[i], timeout=300)
        if r.status_code != 200:
            raise RuntimeError(f"request {i} failed with {r.status_code}: {r.text[:200]}")
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(one, range(len(bodies))))
    return lat, time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``q`` % of the values at or below it."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def main(argv: list[str] | None = None) -> dict:
    """Run both settings and print the figures; returns them (for tests)."""
    from pathlib import Path

    from mmembed.serve.local import LocalServer

    args = parse_args(argv)
    bodies = payloads(args.requests, args.seed)
    warm = payloads(args.concurrency, args.seed + 1)
    results = {}
    for mbs in (args.max_batch_size, 1):
        log = Path(args.log_dir) / f"server-mbs{mbs}.log" if args.log_dir else None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
        cli = ["--device", args.device, "--threads", str(args.threads), "--max-batch-size", str(mbs),
               "--batch-timeout", str(args.batch_timeout)]
        t0 = time.perf_counter()
        with LocalServer(args.model, cli, log_path=log) as srv:
            print(f"server max_batch_size={mbs} ready in {time.perf_counter() - t0:.0f} s at {srv.url}")
            run_load(srv.url, warm, args.concurrency)
            lat, wall = run_load(srv.url, bodies, args.concurrency)
        res = {"p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * percentile(lat, 99),
               "throughput_rps": len(lat) / wall, "wall_s": wall}
        results[mbs] = res
        print(f"max_batch_size={mbs}: {len(lat)} requests, {args.concurrency} concurrent: p50 {res['p50_ms']:.1f} ms, "
              f"p99 {res['p99_ms']:.1f} ms, throughput {res['throughput_rps']:.1f} req/s (wall {wall:.1f} s)")
    ratio = results[args.max_batch_size]["throughput_rps"] / results[1]["throughput_rps"]
    print(f"RATIO throughput dynamic batching (max_batch_size={args.max_batch_size}) / batch size 1 = {ratio:.2f}x "
          f"(model {args.model}, device {args.device}, worker threads {args.threads})")
    return {"results": results, "ratio": ratio}


if __name__ == "__main__":
    main()
