"""``mmembed-serve``: serve a model's embeddings over HTTP (OpenAI embeddings shape) with LitServe.

Examples::

    mmembed-serve --model out/stage3/model                       # http://127.0.0.1:8000/v1/embeddings
    mmembed-serve --model tiny --port 8100 --max-batch-size 16 --device cpu
    mmembed-serve --model out/stage3/model --reranker out/reranker/reranker    # adds /v1/rerank

    curl -s 127.0.0.1:8000/v1/embeddings -H 'content-type: application/json' \\
        -d '{"model": "m", "input": ["a red circle"], "role": "query", "dimensions": 32}'

The official ``openai`` client works unchanged (docs/serving.md): a ``data:image/...;base64,`` string is an image,
image+text inputs go in ``extra_body={"input": [{"text": ..., "image": ...}]}``, ``dimensions`` truncates
(Matryoshka).

Safe by default: binds 127.0.0.1, caps the body size, inputs per request and image pixels, and answers bad input
with a 4xx JSON error while it keeps serving.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from mmembed.serve.protocol import Limits

    d = Limits()
    p = argparse.ArgumentParser(prog="mmembed-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="preset name (e.g. tiny) or local model folder")
    p.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback exposes the server")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute precision (default: the weights' dtype)")
    p.add_argument("--vtc-factor", type=int, default=None, help="override the model's compression factor")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests grouped per forward (dynamic batching)")
    p.add_argument("--batch-timeout", type=float, default=0.01, help="seconds to wait to fill a batch")
    p.add_argument("--encode-batch-size", type=int, default=16, help="items per forward pass")
    p.add_argument("--max-request-mb", type=float, default=d.max_request_bytes / 2**20, help="request body cap")
    p.add_argument("--max-inputs", type=int, default=d.max_inputs, help="inputs per request")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="width x height per image")
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars, help="characters per text")
    p.add_argument("--max-request-pixels", type=int, default=d.max_request_pixels,
                   help="pixels of all images of one request (from their headers, before decoding)")
    p.add_argument("--max-batch-pixels", type=int, default=d.max_batch_pixels,
                   help="decoded pixels held at once over all requests in flight (bounds a dynamic batch)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait before a 504")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the worker (CPU)")
    p.add_argument("--reranker", default=None, help="reranker folder: adds POST /v1/rerank")
    p.add_argument("--log-level", default="warning")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mmembed.serve.protocol import Limits

    try:
        limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_inputs=args.max_inputs,
                        max_image_pixels=args.max_image_pixels, max_text_chars=args.max_text_chars,
                        max_request_pixels=args.max_request_pixels, max_batch_pixels=args.max_batch_pixels)
        from mmembed.serve.server import serve

        extra = {"vtc_factor": args.vtc_factor} if args.vtc_factor is not None else {}
        serve(args.model, host=args.host, port=args.port, log_level=args.log_level, limits=limits,
              max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout,
              encode_batch_size=args.encode_batch_size, precision=args.precision, device=args.device,
              reranker=args.reranker, timeout=args.timeout, threads=args.threads, **extra)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise SystemExit(f"mmembed-serve: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
