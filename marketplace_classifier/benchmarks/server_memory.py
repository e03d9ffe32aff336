"""Memory of each engine as a whole (every process it starts: TorchServe's frontend and workers;
the second engine's driver, Ray's processes and replicas), in PSS so that shared pages count
once: at start, after warm-up, at its peak under the heaviest admitted load (four of each of the
largest requests the work budget admits at once, per model, beside ordinary traffic), and after
a flood of refused 20 MB bodies. This is what a container's memory request and limit must hold.

Usage: python -m marketplace_classifier.benchmarks.server_memory [--artifacts-dir artifacts] [--engines
torchserve kserve_ray]
       [--out reports/memory]
Writes memory.json and memory.md under --out and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

from marketplace_classifier.benchmarks.budget_bench import requests_for
from marketplace_classifier.benchmarks.engines_bench import kserve_ray, torchserve
from marketplace_classifier.benchmarks.harness import missing_exports, torchserve_frontend
from marketplace_classifier.benchmarks.load import sample_photo, sample_text
from marketplace_classifier.ops import serve
from marketplace_classifier.ops.hostile import v1, v1_photos
from marketplace_classifier.serving.budget import WorkBudget
from marketplace_classifier.serving.config import MAX_REQUEST_BYTES, MODEL_CONFIG
from marketplace_classifier.serving.model_kinds import MODEL_KINDS, model_kind

ROOT = serve.ROOT
MIB = 2**20
AT_ONCE = 4  # the largest requests sent together: one batch's worth (batchSize)
WARM_UP = 8  # ordinary requests per model before measuring
FLOOD = 16  # refused 20 MB bodies sent at once
IDLE_S = 20  # the wait after the flood, before "after it" is read (TorchServe's JVM collects every 5 s)
HEADROOM = 1.25  # a limit is the peak plus a quarter, rounded up to a whole GiB


def tree_pss_mib(root: psutil.Process) -> int:
    """PSS of `root` and every process below it."""
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += process.memory_full_info().pss
    return round(total / MIB)


class PeakSampler:
    """The highest tree PSS seen, sampled in the background while a load runs."""

    def __init__(self, root: psutil.Process, every_s: float = 0.25):
        self.root, self.every_s, self.peak = root, every_s, 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stop_event.is_set():
            self.peak = max(self.peak, tree_pss_mib(self.root))
            self.stop_event.wait(self.every_s)

    def __enter__(self) -> PeakSampler:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop_event.set()
        self.thread.join()


def post(url: str, headers: dict, body: bytes) -> int:
    try:
        return requests.post(url, data=body, timeout=300,
                             headers=headers | {"Content-Type": "application/json"}).status_code
    except requests.RequestException:
        return 0


def ordinary_body(model: str, rng: random.Random) -> bytes:
    """One listing of typical size as KServe v1 JSON: a 1000x750 photo and/or a description."""
    kind = model_kind(model)
    text = sample_text(rng) if kind.uses_text else None
    if not kind.uses_image:
        return v1([{"text": text}])
    return v1_photos([sample_photo(rng)], 1, text)


def ordinary_bodies(model: str, count: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [ordinary_body(model, rng) for _ in range(count)]


def heaviest_load(url: str, headers: dict, models: list[str], budget: WorkBudget) -> dict[str, list[int]]:
    """For each model and each of its largest admitted requests: AT_ONCE of them at once while one
    client keeps sending ordinary requests; the statuses of each kind."""
    statuses: dict[str, list[int]] = {"heavy": [], "ordinary": []}
    for model in models:
        target, ordinary = url.format(model=model), ordinary_bodies(model, 16)
        for body in requests_for(model, budget).values():
            with ThreadPoolExecutor(AT_ONCE + 1) as pool:
                heavy = [pool.submit(post, target, headers, body) for _ in range(AT_ONCE)]
                while not all(answer.done() for answer in heavy):
                    statuses["ordinary"].append(post(target, headers, random.choice(ordinary)))
                statuses["heavy"] += [answer.result() for answer in heavy]
    return statuses


def refused_bodies(url: str, headers: dict, model: str) -> list[int]:
    """FLOOD bodies at once, just inside the size limit, holding millions of empty listings."""
    items = (MAX_REQUEST_BYTES - 64) // 3
    body = b'{"instances": [' + b"{}," * items + b"{}]}"
    with ThreadPoolExecutor(FLOOD) as pool:
        return list(pool.map(lambda _: post(url.format(model=model), headers, body), range(FLOOD)))


def own_pss_mib(process: psutil.Process) -> int:
    return round(process.memory_full_info().pss / MIB)


def measure_engine(root: psutil.Process, url: str, headers: dict, models: list[str]) -> dict:
    figures = {"at_start_mib": tree_pss_mib(root)}
    for model in models:
        for body in ordinary_bodies(model, WARM_UP, seed=1):
            post(url.format(model=model), headers, body)
    figures["after_warm_up_mib"] = tree_pss_mib(root)
    budget = WorkBudget.from_options(MODEL_CONFIG["handler"])
    with PeakSampler(root) as sampler:
        statuses = heaviest_load(url, headers, models, budget)
    figures |= {"peak_under_load_mib": sampler.peak, "after_load_mib": tree_pss_mib(root),
                "front_after_load_mib": own_pss_mib(root)}
    with PeakSampler(root) as sampler:
        figures["refused_statuses"] = counted(refused_bodies(url, headers, "text" if "text" in models
                                                             else models[0]))
    time.sleep(IDLE_S)
    figures |= {"peak_refused_mib": sampler.peak, "after_refused_mib": tree_pss_mib(root)}
    # the front process (TorchServe's JVM, the second engine's driver) reads every body itself
    figures["front_after_refused_mib"] = own_pss_mib(root)
    figures["processes"] = 1 + len(root.children(recursive=True))
    figures["heavy_statuses"] = counted(statuses["heavy"])
    figures["ordinary_statuses"] = counted(statuses["ordinary"])
    peak = max(figures["peak_under_load_mib"], figures["peak_refused_mib"])
    figures["limit_gib"] = math.ceil(peak * HEADROOM / 1024)
    return figures


def measure(engine: str, artifacts: Path, models: list[str]) -> dict:
    started = time.monotonic()
    if engine == "torchserve":
        with torchserve(artifacts, models) as (url, token, state):
            figures = measure_engine(torchserve_frontend(state), url, {"Authorization": f"Bearer {token}"},
                                     models)
    else:
        with kserve_ray(artifacts) as (url, driver):
            figures = measure_engine(driver, url, {}, models)
    return {"engine": engine, "models": models, "workers_per_model": MODEL_CONFIG["minWorkers"],
            "seconds": round(time.monotonic() - started)} | figures


def counted(codes: list[int]) -> dict[str, int]:
    return {str(code): codes.count(code) for code in sorted(set(codes))}


def markdown(rows: list[dict]) -> str:
    lines = ["| engine | processes | at start | after warm-up | peak, heaviest admitted load | after it | "
             f"peak, {FLOOD} refused 20 MB bodies at once | {IDLE_S} s after | "
             "front process: after load / after flood | limit (highest peak x 1.25) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['engine']} | {row['processes']} | {row['at_start_mib']:,} MiB | "
                     f"{row['after_warm_up_mib']:,} MiB | {row['peak_under_load_mib']:,} MiB "
                     f"(heavy: {statuses(row['heavy_statuses'])}; ordinary: "
                     f"{statuses(row['ordinary_statuses'])}) | {row['after_load_mib']:,} MiB | "
                     f"{row['peak_refused_mib']:,} MiB ({statuses(row['refused_statuses'])}) | "
                     f"{row['after_refused_mib']:,} MiB | "
                     f"{row['front_after_load_mib']:,} / {row['front_after_refused_mib']:,} MiB | "
                     f"{row['limit_gib']} GiB |")
    return "\n".join(lines) + "\n"


def statuses(counts: dict) -> str:
    return ", ".join(f"{count}x {code}" for code, count in counts.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--engines", nargs="+", default=["torchserve", "kserve_ray"],
                        choices=("torchserve", "kserve_ray"))
    parser.add_argument("--model", nargs="+", default=list(MODEL_KINDS), choices=MODEL_KINDS)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "memory")
    args = parser.parse_args(argv)
    error = missing_exports(args.artifacts_dir, args.model)
    if error:
        print(error, file=sys.stderr)
        return 2
    rows = []
    try:
        for engine in args.engines:
            rows.append(measure(engine, args.artifacts_dir, args.model))
            print(json.dumps(rows[-1]), flush=True)
    except (serve.ServeError, RuntimeError) as failure:
        print(f"error: {failure}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(rows, indent=2))
    (args.out / "memory.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
