"""The work budget, measured: the largest requests the limits admit, each answered by a worker
with one thread, alone and four to a batch, against half the response timeout.

Usage: python -m marketplace_classifier.benchmarks.budget_bench [--artifacts-dir artifacts] [--out
reports/budget]
Writes budget.json and budget.md under --out and prints the table. The worker runs with one
thread (`handler.threads: 1`), so each figure is the time of one core.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from marketplace_classifier.benchmarks.harness import missing_exports, temporary_server
from marketplace_classifier.benchmarks.load import sample_photo, sample_text
from marketplace_classifier.ops import serve
from marketplace_classifier.ops.hostile import lossless_webp, progressive_jpeg, v1, v1_photos
from marketplace_classifier.serving.budget import WorkBudget
from marketplace_classifier.serving.config import MODEL_CONFIG
from marketplace_classifier.serving.model_kinds import MODEL_KINDS, model_kind
from marketplace_classifier.serving.payloads import DEFAULT_MAX_PHOTOS
from marketplace_classifier.serving.processing import MAX_FIELD_CHARS

ROOT = serve.ROOT
BATCH = 4  # MODEL_CONFIG's batchSize: four of the largest requests in one batch


def largest_photo_requests(budget: WorkBudget) -> dict[str, list[bytes]]:
    """The photo requests at the edge of the budget, as their photos: the most photos, the most
    pixels, and the most JPEG scans over those pixels."""
    photos, pixels, scans = budget.photos_per_request, budget.pixels_per_request, budget.scans_per_photo
    big_side = math.isqrt(min(pixels // 2, 50_000_000))
    small_side = math.isqrt(pixels // photos)
    base_scans = 10  # what Pillow's progressive encoder writes
    rng = random.Random(0)
    ordinary = [sample_photo(rng) for _ in range(photos)]
    return {
        f"{photos} photos of 1000x750": ordinary,
        f"2 lossless WebPs of {big_side}x{big_side}": [lossless_webp(big_side)] * 2,
        f"2 progressive JPEGs of {big_side}x{big_side}, {scans} scans":
            [progressive_jpeg((big_side, big_side), scans - base_scans)] * 2,
        f"{photos} progressive JPEGs of {small_side}x{small_side}, {scans} scans":
            [progressive_jpeg((small_side, small_side), scans - base_scans)] * photos,
    }


def requests_for(model: str, budget: WorkBudget) -> dict[str, bytes]:
    longest = (sample_text(random.Random(1)) + " ") * 400
    longest = longest[:MAX_FIELD_CHARS]
    kind = model_kind(model)
    if not kind.uses_image:
        listing = {"product_name": longest, "product_description": longest}
        return {"64 listings, 10,000 + 10,000 characters each": v1([listing] * 64)}
    text = longest if kind.uses_text else None
    return {name: v1_photos(photos, DEFAULT_MAX_PHOTOS, text)
            for name, photos in largest_photo_requests(budget).items()}


def post(url: str, token: str, body: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    response = requests.post(url, data=body, timeout=300, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    return response.status_code, time.perf_counter() - started


def measure(model: str, artifacts: Path, budget: WorkBudget) -> list[dict]:
    config = MODEL_CONFIG | {"minWorkers": 1, "maxWorkers": 1, "maxBatchDelay": 500,
                             "handler": MODEL_CONFIG["handler"] | {"threads": 1}}
    rows = []
    with temporary_server(artifacts, [model], config) as (properties, state):
        token = serve.read_key(state / "key_file.json")
        url = f"{properties['inference_address']}/predictions/{model}"
        for name, body in requests_for(model, budget).items():
            post(url, token, body)  # warm-up: the first call pays for lazy initialisation
            status, alone = post(url, token, body)
            started = time.perf_counter()
            with ThreadPoolExecutor(BATCH) as pool:
                batch = list(pool.map(post, [url] * BATCH, [token] * BATCH, [body] * BATCH))
            rows.append({"model": model, "request": name, "megabytes": round(len(body) / 1e6, 2),
                         "status": status, "seconds_alone": round(alone, 2),
                         "batch_statuses": sorted(code for code, _ in batch),
                         "seconds_batch_of_4": round(time.perf_counter() - started, 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], timeout: float) -> str:
    lines = [f"Response timeout {timeout:.0f} s; the budget must keep each request under {timeout / 2:.0f} s "
             "and each batch under the timeout, on one core.", "",
             "| model | largest admitted request | MB | status | alone (s) | 4 at once: statuses | "
             "4 at once (s) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['request']} | {row['megabytes']} | {row['status']} | "
                     f"{row['seconds_alone']} | {' '.join(map(str, row['batch_statuses']))} | "
                     f"{row['seconds_batch_of_4']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "budget")
    parser.add_argument("--model", nargs="+", default=list(MODEL_KINDS), choices=MODEL_KINDS)
    args = parser.parse_args(argv)
    error = missing_exports(args.artifacts_dir, args.model)
    if error:
        print(error, file=sys.stderr)
        return 2
    budget = WorkBudget.from_options(MODEL_CONFIG["handler"])
    rows = [row for model in args.model for row in measure(model, args.artifacts_dir, budget)]
    timeout = MODEL_CONFIG["responseTimeout"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budget.json").write_text(json.dumps({"budget": budget.__dict__, "timeout_s": timeout,
                                                      "rows": rows}, indent=2))
    (args.out / "budget.md").write_text(markdown(rows, timeout))
    print(markdown(rows, timeout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
