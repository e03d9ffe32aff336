"""Served throughput and p99 at concurrency 16 over a grid of workers x batch size, repeated.

Usage: python -m marketplace_classifier.benchmarks.tune [--workers 1 2] [--batch-sizes 1 4] [--repeats 2]
[--requests 256]
Writes reports/benchmark/tuning.{json,md} and prints the table. This is how the per-model
settings in marketplace_classifier/ops/archive.py were chosen; configurations alternate so drift hits them
all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

from marketplace_classifier.benchmarks.harness import ROOT, served
from marketplace_classifier.serving.config import MODEL_CONFIG
from marketplace_classifier.serving.model_kinds import MODEL_KINDS as MODELS


def tune(artifacts: Path, workers: list[int], batch_sizes: list[int], repeats: int,
         requests: int) -> dict:
    grid = [(w, b) for w in workers for b in batch_sizes]
    runs: dict = {f"{w}x{b}": {model: [] for model in MODELS} for w, b in grid}
    for _ in range(repeats):
        for w, b in grid:
            config = MODEL_CONFIG | {"minWorkers": w, "maxWorkers": w, "batchSize": b,
                                     "maxBatchDelay": MODEL_CONFIG["maxBatchDelay"] if b > 1 else 0}
            result = served(list(MODELS), artifacts, config, requests, (16,), 120)
            for model in MODELS:
                runs[f"{w}x{b}"][model].append(result[model][16])
    return runs


def markdown(runs: dict) -> str:
    lines = ["| workers x batch | " + " | ".join(f"{m} items/s (p99 ms)" for m in MODELS) + " |",
             "|---|" + "---|" * len(MODELS)]
    for name, models in runs.items():
        cells = []
        for model in MODELS:
            rates = [run["throughput"] for run in models[model]]
            p99 = statistics.median(run["p99_ms"] for run in models[model])
            cells.append(f"{statistics.median(rates):.1f} [{min(rates):.1f}-{max(rates):.1f}] ({p99:.0f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="`torch.jit", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmark")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=256)
    args = parser.parse_args(argv)
    runs = tune(args.artifacts_dir, args.workers, args.batch_sizes, args.repeats, args.requests)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tuning.json").write_text(json.dumps(runs, indent=2) + "\n")
    table = markdown(runs)
    (args.out / "tuning.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
