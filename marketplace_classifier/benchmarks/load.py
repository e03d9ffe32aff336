"""A bounded load generator for the served models: N requests at concurrency C, over REST.

Usage: python -m marketplace_classifier.benchmarks.load --model text --requests 200 --concurrency 16
[--max-seconds 60]
Prints throughput (items/s), p50/p95/p99 latency (ms) and the error count as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image, ImageDraw

from marketplace_classifier.ops.serve import ROOT, read_key, read_properties
from marketplace_classifier.serving.model_kinds import MODEL_KINDS, model_kind

WORDS = ("sofa", "table", "chairs", "oak", "console", "ps5", "controller", "kettle", "drill", "bike",
         "helmet", "dress", "boots", "laptop", "monitor", "pram", "cot", "perfume", "guitar", "vinyl",
         "desk", "phone", "case", "good", "condition", "collection", "only", "offers", "boxed")


def sample_photo(rng: random.Random) -> bytes:
    """A photo of typical marketplace size (1000x750 JPEG)."""
    picture = Image.new("RGB", (1000, 750), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(picture)
    for _ in range(40):
        x, y = rng.randrange(1000), rng.randrange(750)
        draw.ellipse((x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def sample_text(rng: random.Random) -> str:
    """Word counts like the real descriptions (median ~28, 90th percentile ~100)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(3, int(rng.lognormvariate(3.33, 0.85)))))


def make_request(model: str, rng: random.Random) -> dict:
    """One listing in the plain format: a JPEG body, a text/plain body, or a form with both."""
    kind = model_kind(model)
    if not kind.uses_text:
        return {"data": sample_photo(rng), "headers": {"Content-Type": "image/jpeg"}}
    if not kind.uses_image:
        return {"data": sample_text(rng).encode(), "headers": {"Content-Type": "text/plain"}}
    return {"files": {"image": ("p.jpg", sample_photo(rng), "image/jpeg")},
            "data": {"text": sample_text(rng)}, "headers": {}}


def post_payload(url: str, headers: dict, payload: dict) -> bool:
    """Send one prepared request (see make_request); True when it was answered with 200."""
    extra = {key: value for key, value in payload.items() if key != "headers"}
    try:
        return requests.post(url, headers=headers | payload["headers"], timeout=120,
                             **extra).status_code == 200
    except requests.RequestException:
        return False


def run_load(url: str, token: str | None, payloads: list[dict], concurrency: int,
             max_seconds: float) -> dict:
    latencies, errors, lock = [], 0, threading.Lock()
    deadline = time.monotonic() + max_seconds
    session_headers = {"Authorization": f"Bearer {token}"} if token else {}

    def send(payload: dict) -> None:
        nonlocal errors
        if time.monotonic() > deadline:
            return
        started = time.perf_counter()
        ok = post_payload(url, session_headers, payload)
        with lock:
            latencies.append(time.perf_counter() - started)
            errors += not ok

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, payloads))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def percentile(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
            "throughput": round(len(latencies) / elapsed, 2),
            "p50_ms": round(percentile(0.5), 1), "p95_ms": round(percentile(0.95), 1),
            "p99_ms": round(percentile(0.99), 1),
            "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODEL_KINDS, required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=ROOT / "config.properties")
    parser.add_argument("--key-file", type=Path, default=ROOT / ".serve" / "key_file.json")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    distinct = [make_request(args.model, rng) for _ in range(min(args.requests, 32))]
    payloads = [distinct[i % len(distinct)] for i in range(args.requests)]
    url = f"{read_properties(args.config)['inference_address']}/predictions/{args.model}"
    token = read_key(args.key_file) if args.key_file.exists() else None
    result = run_load(url, token, payloads, args.concurrency, args.max_seconds)
    print(json.dumps({"model": args.model, "concurrency": args.concurrency} | result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
