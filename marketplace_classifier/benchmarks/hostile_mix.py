"""The mixed run of the outside hostile-input test: ordinary clients of all three models while
one more client sends every hostile request (marketplace_classifier/ops/hostile.py) and the largest requests
the
work budget admits among them, against a fresh TorchServe with the shipped batching, workers and
timeouts.

Usage: python -m marketplace_classifier.benchmarks.hostile_mix [--artifacts-dir artifacts] [--clients 16]
[--minutes 3]
       [--out reports/hostile_mix]
Passes when no ordinary request fails, every hostile one is refused with a 4xx and every largest
admitted one answered (a 503 to retry allowed for both), and no worker was restarted. Writes
hostile_mix.json and hostile_mix.md; exits 1 when it did not pass.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from marketplace_classifier.benchmarks.budget_bench import requests_for
from marketplace_classifier.benchmarks.harness import missing_exports, temporary_server
from marketplace_classifier.benchmarks.load import make_request, post_payload
from marketplace_classifier.ops import serve
from marketplace_classifier.ops.hostile import Trigger, round_one, triggers
from marketplace_classifier.serving.budget import WorkBudget
from marketplace_classifier.serving.config import MODEL_CONFIG
from marketplace_classifier.serving.model_kinds import MODEL_KINDS

ROOT = serve.ROOT
RETRY = 503  # a batch's budget was spent: the request may be sent again


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.good, self.good_failed, self.hostile = Counter(), Counter(), {}

    def add_good(self, model: str, ok: bool) -> None:
        with self.lock:
            self.good[model] += 1
            self.good_failed[model] += not ok

    def add_hostile(self, name: str, status: int, seconds: float) -> None:
        with self.lock:
            entry = self.hostile.setdefault(name, {"statuses": Counter(), "max_seconds": 0.0})
            entry["statuses"][status] += 1
            entry["max_seconds"] = max(entry["max_seconds"], round(seconds, 2))


def good_client(base: str, token: str, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    payloads = {model: [make_request(model, rng) for _ in range(4)] for model in MODEL_KINDS}
    headers = {"Authorization": f"Bearer {token}"}
    turn = seed
    while time.monotonic() < until:
        model = MODEL_KINDS[turn % len(MODEL_KINDS)]
        turn += 1
        ok = post_payload(f"{base}/predictions/{model}", headers, payloads[model][turn % 4])
        tally.add_good(model, ok)


def hostile_client(base: str, token: str, corpus: dict[str, Trigger], until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        for name, trigger in corpus.items():
            if time.monotonic() >= until:
                return
            started = time.perf_counter()
            try:
                status = requests.post(f"{base}/predictions/{trigger.model}", data=trigger.body, timeout=120,
                                       headers={"Authorization": f"Bearer {token}",
                                                "Content-Type": trigger.content_type}).status_code
            except requests.RequestException:
                status = 0
            tally.add_hostile(name, status, time.perf_counter() - started)


def largest_admitted(budget: WorkBudget) -> dict[str, Trigger]:
    """The dearest requests the budget lets through (benchmarks/budget_bench.py): answered, or 503
    when a batch-mate took the batch's budget."""
    return {f"largest admitted, {model}: {name}": Trigger(model, body, "application/json", frozenset({200}))
            for model in MODEL_KINDS for name, body in requests_for(model, budget).items()}


def run(artifacts: Path, clients: int, minutes: float) -> dict:
    corpus = round_one() | triggers() | largest_admitted(WorkBudget.from_options(MODEL_CONFIG["handler"]))
    tally = Tally()
    with temporary_server(artifacts, list(MODEL_KINDS), MODEL_CONFIG) as (properties, state):
        token = serve.read_key(state / "key_file.json")
        base = properties["inference_address"]
        before = serve.worker_pids(properties, state / "key_file.json", list(MODEL_KINDS))
        until = time.monotonic() + minutes * 60
        with ThreadPoolExecutor(clients + 1) as pool:
            jobs = [pool.submit(good_client, base, token, seed, until, tally) for seed in range(clients)]
            jobs.append(pool.submit(hostile_client, base, token, corpus, until, tally))
            for job in jobs:
                job.result()
        after = serve.worker_pids(properties, state / "key_file.json", list(MODEL_KINDS))
    wrong = {name: dict(entry["statuses"]) for name, entry in tally.hostile.items()
             if set(entry["statuses"]) - set(corpus[name].expected) - {RETRY}}
    return {
        "clients": clients, "minutes": minutes, "model_config": MODEL_CONFIG,
        "good_requests": sum(tally.good.values()), "good_failed": sum(tally.good_failed.values()),
        "good_per_model": dict(tally.good), "good_failed_per_model": dict(tally.good_failed),
        "hostile_requests": sum(sum(e["statuses"].values()) for e in tally.hostile.values()),
        "hostile": {name: {"statuses": dict(e["statuses"]), "max_seconds": e["max_seconds"]}
                    for name, e in tally.hostile.items()},
        "hostile_answered_wrong": wrong,
        "workers_restarted": {model: before[model] != after[model] for model in MODEL_KINDS},
    }


def markdown(result: dict) -> str:
    lines = [f"{result['clients']} ordinary clients for {result['minutes']:g} min beside one hostile client; "
             f"passed: {'yes' if passed(result) else 'NO'}.", "",
             "| model | ordinary requests | failed | workers restarted |", "|---|---|---|---|"]
    for model in MODEL_KINDS:
        lines.append(f"| {model} | {result['good_per_model'].get(model, 0)} | "
                     f"{result['good_failed_per_model'].get(model, 0)} | "
                     f"{'yes' if result['workers_restarted'][model] else 'no'} |")
    lines += ["", "| hostile request | answers | slowest (s) |", "|---|---|---|"]
    for name, entry in sorted(result["hostile"].items()):
        answers = ", ".join(f"{count} x {status}" for status, count in sorted(entry["statuses"].items()))
        lines.append(f"| {name} | {answers} | {entry['max_seconds']} |")
    return "\n".join(lines) + "\n"


def passed(result: dict) -> bool:
    return result["good_failed"] == 0 and not result["hostile_answered_wrong"] and \
        not any(result["workers_restarted"].values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "hostile_mix")
    args = parser.parse_args(argv)
    error = missing_exports(args.artifacts_dir, list(MODEL_KINDS))
    if error:
        print(error, file=sys.stderr)
        return 2
    result = run(args.artifacts_dir, args.clients, args.minutes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hostile_mix.json").write_text(json.dumps(result, indent=2))
    (args.out / "hostile_mix.md").write_text(markdown(result))
    summary = {key: result[key] for key in ("good_requests", "good_failed", "hostile_requests",
                                            "hostile_answered_wrong", "workers_restarted")}
    print(json.dumps(summary | {"passed": passed(result)}, indent=2))
    return 0 if passed(result) else 1


if __name__ == "__main__":
    raise SystemExit(main())
