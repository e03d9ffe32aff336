"""Soak test: all three models driven at once, at the throughput `make bench` measured, for a
bounded time. Reports requests, errors and p99 latency per minute, worker memory at start and
end, and whether /ping stayed healthy.

Usage: python -m marketplace_classifier.benchmarks.soak [--minutes 10] [--rate-share 1.0] [--out reports/soak]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from marketplace_classifier.benchmarks.harness import temporary_server
from marketplace_classifier.benchmarks.load import make_request, post_payload
from marketplace_classifier.ops import serve
from marketplace_classifier.serving.config import MODEL_CONFIG
from marketplace_classifier.serving.layout import ExportLayout
from marketplace_classifier.serving.model_kinds import MODEL_KINDS

ROOT = serve.ROOT
MODELS = MODEL_KINDS
DEFAULT_RATE = 5.0  # requests/s per model when no benchmark report exists
MAX_IN_FLIGHT = 32  # per model; beyond it a request counts as an error, so the run stays bounded


def target_rates(benchmark: Path, share: float) -> dict[str, float]:
    """Each model's served throughput at concurrency 16 in the latest benchmark, shared among
    the three models that now run at once."""
    if not benchmark.exists():
        return {model: DEFAULT_RATE * share for model in MODELS}
    report = json.loads(benchmark.read_text())["models"]
    return {model: report[model]["served"]["16"]["throughput"] * share / len(MODELS) for model in MODELS}


class Recorder:
    def __init__(self):
        self.lock, self.rows, self.shed = threading.Lock(), [], 0

    def add(self, model: str, started: float, latency: float, ok: bool) -> None:
        with self.lock:
            self.rows.append((model, started, latency, ok))


def drive(url: str, token: str, model: str, rate: float, until: float, recorder: Recorder,
          pool: ThreadPoolExecutor) -> None:
    """Open-loop: send at a fixed rate whatever the latency, as real clients do."""
    rng = random.Random(model)
    payloads = [make_request(model, rng) for _ in range(16)]
    headers = {"Authorization": f"Bearer {token}"}

    in_flight = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    def one(payload: dict) -> None:
        started = time.monotonic()
        try:
            ok = post_payload(url, headers, payload)
        finally:
            in_flight.release()
        recorder.add(model, started, time.monotonic() - started, ok)

    next_send, index = time.monotonic(), 0
    while next_send < until:
        time.sleep(max(0.0, next_send - time.monotonic()))
        if in_flight.acquire(blocking=False):
            pool.submit(one, payloads[index % len(payloads)])
        else:  # the server is behind: count the request as failed rather than queue without end
            recorder.add(model, next_send, 0.0, False)
            recorder.shed += 1
        index += 1
        next_send += 1 / rate


def worker_memory(properties: dict, state: Path) -> dict[str, int]:
    """Resident memory (bytes) of each model's worker processes, read from /proc."""
    token = serve.read_key(state / "key_file.json", "management")
    memory = {}
    for model in MODELS:
        url = f"{properties['management_address']}/models/{model}"
        described = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
        memory[model] = sum(resident_bytes(worker["pid"]) for worker in described[0]["workers"])
    return memory


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def watch_ping(properties: dict, state: Path, until: float, results: list) -> None:
    while time.monotonic() < until:
        try:
            token = serve.read_key(state / "key_file.json")
            response = requests.get(f"{properties['inference_address']}/ping", timeout=10,
                                    headers={"Authorization": f"Bearer {token}"})
            results.append(response.ok and response.json().get("status") == "Healthy")
        except (requests.RequestException, ValueError):
            results.append(False)
        time.sleep(5)


def say_each_minute(recorder: Recorder, start: float, until: float, stream=None) -> None:
    """One line a minute on standard error, so a long soak shows it is alive and how it goes."""
    minutes = max(1, round((until - start) / 60))
    for minute in range(1, minutes + 1):
        time.sleep(max(0.0, min(start + 60 * minute, until) - time.monotonic()))
        with recorder.lock:
            rows = list(recorder.rows)
        errors = sum(not ok for *_, ok in rows)
        print(f"soak [{minute}/{minutes} min] {len(rows)} requests, {errors} errors so far",
              file=stream or sys.stderr, flush=True)


def per_minute(rows: list, start: float, minutes: int) -> list[dict]:
    table = []
    for minute in range(minutes):
        for model in MODELS:
            chosen = sorted(latency for name, started, latency, _ in rows
                            if name == model and minute * 60 <= started - start < (minute + 1) * 60)
            errors = sum(1 for name, started, _, ok in rows
                         if name == model and not ok and minute * 60 <= started - start < (minute + 1) * 60)
            p99 = 1000 * chosen[min(len(chosen) - 1, int(0.99 * len(chosen)))] if chosen else None
            table.append({"minute": minute + 1, "model": model, "requests": len(chosen),
                          "errors": errors, "p99_ms": round(p99, 1) if p99 else None})
    return table


def soak(artifacts: Path, minutes: float, rates: dict[str, float]) -> dict:
    with temporary_server(artifacts, list(MODELS), MODEL_CONFIG) as (properties, state):
        token = serve.read_key(state / "key_file.json")
        memory_start = worker_memory(properties, state)
        recorder, pings = Recorder(), []
        start = time.monotonic()
        until = start + 60 * minutes
        with ThreadPoolExecutor(48) as pool:
            threads = [threading.Thread(target=drive, args=(
                f"{properties['inference_address']}/predictions/{model}", token, model, rates[model],
                until, recorder, pool)) for model in MODELS]
            threads.append(threading.Thread(target=watch_ping, args=(properties, state, until, pings)))
            threads.append(threading.Thread(target=say_each_minute, args=(recorder, start, until)))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        memory_end = worker_memory(properties, state)
    rows = recorder.rows
    return {"minutes": minutes, "target_rates": rates, "requests": len(rows),
            "errors": sum(not ok for *_, ok in rows), "shed_by_client": recorder.shed,
            "per_minute": per_minute(rows, start, int(minutes + 0.999)),
            "worker_memory_start": memory_start, "worker_memory_end": memory_end,
            "ping_checks": len(pings), "ping_always_healthy": all(pings) and bool(pings)}


def markdown(report: dict) -> str:
    lines = [f"Soak: {report['minutes']} min, {report['requests']} requests, {report['errors']} errors "
             f"({report['shed_by_client']} of them not sent: over {MAX_IN_FLIGHT} in flight), "
             f"/ping healthy in {'all' if report['ping_always_healthy'] else 'not all'} of "
             f"{report['ping_checks']} checks.", "",
             "| model | target req/s | worker RSS start -> end (MB) | requests per minute "
             "| p99 ms per minute |",
             "|---|---|---|---|---|"]
    for model in MODELS:
        rows = [row for row in report["per_minute"] if row["model"] == model]
        lines.append(
            f"| {model} | {report['target_rates'][model]:.1f} | "
            f"{report['worker_memory_start'][model] / 2**20:.0f} -> "
            f"{report['worker_memory_end'][model] / 2**20:.0f} | "
            f"{' '.join(str(row['requests']) for row in rows)} | "
            f"{' '.join(str(row['p99_ms']) for row in rows)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate-share", type=float, default=1.0,
                        help="fraction of the benchmarked throughput to drive")
    parser.add_argument("--benchmark", type=Path, default=ROOT / "reports" / "benchmark" / "benchmark.json")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "soak")
    args = parser.parse_args(argv)
    for model in MODELS:
        if not ExportLayout(args.artifacts_dir / model).model.exists():
            print(f"error: {args.artifacts_dir / model / 'model.pt'} not found: run `make demo` first",
                  file=sys.stderr)
            return 2
    report = soak(args.artifacts_dir, args.minutes, target_rates(args.benchmark, args.rate_share))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "soak.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
