"""Benchmark: the model's own speed, the served speed (batching on and off) and a naive baseline.

Usage: python -m marketplace_classifier.benchmarks.bench [--artifacts-dir artifacts] [--checkpoint-dir
checkpoints]
       [--out reports/benchmark] [--scale 1.0]
Writes benchmark.json, benchmark.md and benchmark.png under --out and prints the table. Every
compared pair is measured in the same run; the figures are items per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch

from marketplace_classifier.benchmarks.bench_report import BATCH_SIZES, CONCURRENCY, markdown, write_report
from marketplace_classifier.benchmarks.harness import reported, served
from marketplace_classifier.benchmarks.load import make_request
from marketplace_classifier.ops import serve
from marketplace_classifier.progress import Steps
from marketplace_classifier.serving.config import MODEL_CONFIG, MODEL_HANDLER_OPTIONS
from marketplace_classifier.serving.exported import ExportedModel, optimise_for_device
from marketplace_classifier.serving.layout import ExportLayout
from marketplace_classifier.serving.model_kinds import IMAGE, MODEL_KINDS
from marketplace_classifier.serving.processing import (
    decode_image,
    fit_to_square,
    free_text,
    image_to_tensor,
    lexical_batch,
    model_image_from_bytes,
    model_inputs,
)
from marketplace_classifier.serving.settings import TORCHSCRIPT

ROOT = serve.ROOT

MODELS = MODEL_KINDS
NAIVE_TEXT_TOKENS = 200


def timed_rate(step, items_per_call: int, min_seconds: float, max_calls: int) -> float:
    """Items per second of `step()`, after one warm-up call."""
    step()
    calls, started = 0, time.perf_counter()
    while calls < max_calls and (calls == 0 or time.perf_counter() - started < min_seconds):
        step()
        calls += 1
    return calls * items_per_call / (time.perf_counter() - started)


class Inputs:
    """Realistic requests and the model inputs the handler would make of them."""

    def __init__(self, model: str, folder: Path, count: int, seed: int = 0):
        rng = random.Random(seed)
        exported = ExportedModel.load(folder)
        self.model, self.kind, self.settings = model, exported.kind, exported.settings
        self.requests = [make_request(model, rng) for _ in range(count)]
        self.tokenizer = exported.tokenizer

    def photo(self, index: int) -> bytes:
        request = self.requests[index]
        return request["files"]["image"][1] if self.kind.fuses else request["data"]

    def text(self, index: int) -> str:
        request = self.requests[index]
        return request["data"]["text"] if self.kind.fuses else request["data"].decode()

    def batches(self, size: int, count: int = 4) -> list[tuple[torch.Tensor, ...]]:
        """`count` consecutive batches of `size` requests, wrapping around the requests."""
        return [self.batch([(start + i) % len(self.requests) for i in range(size)])
                for start in range(0, count * size, size)]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        images = [model_image_from_bytes(self.photo(i), self.settings.image.size)
                  for i in indices] if self.kind.uses_image else None
        texts = [free_text(self.text(i)) for i in indices] if self.kind.uses_text else None
        return model_inputs(self.kind, images, texts, self.tokenizer, self.settings.text)


def model_limit(model: str, folder: Path, inputs: Inputs, threads: int, seconds: float) -> dict:
    """In-process TorchScript items/s per batch size, inputs prepared beforehand."""
    torch.set_num_threads(threads)
    # the model exactly as the handler runs it
    enabled = MODEL_HANDLER_OPTIONS.get(model, {}).get("optimize_for_inference", False)
    scripted = ExportedModel.load(folder, optimize_for_inference=enabled, runtime=TORCHSCRIPT).model
    rates = {}
    with torch.inference_mode():
        for size in BATCH_SIZES:
            batches = inputs.batches(size)
            rates[size] = timed_rate(_cycling(scripted, batches), size, seconds, 200)
    return rates


def other_worker_count(workers: int) -> int:
    """The alternative split of the cores that the benchmark measures against the configured one."""
    return 1 if workers > 1 else max(2, os.cpu_count() or 1)


def layout_trials(model: str, folder: Path, inputs: Inputs, threads: int, seconds: float,
                  batch: int) -> dict:
    """In-process items/s at the configured batch: the plain TorchScript, frozen +
    optimize_for_inference, and (image branch) channels-last inputs and weights on top."""
    torch.set_num_threads(threads)
    batches = inputs.batches(batch)
    plain = ExportedModel.load(folder, runtime=TORCHSCRIPT).model
    variants = {"plain": (plain, batches),
                "optimize_for_inference": (optimise_for_device(plain, torch.device("cpu"), True), batches)}
    if inputs.kind.uses_image:
        last = [(b[0].contiguous(memory_format=torch.channels_last), *b[1:]) for b in batches]
        weights = ExportedModel.load(folder, runtime=TORCHSCRIPT).model.to(memory_format=torch.channels_last)
        variants["channels_last"] = (weights, last)
        variants["optimize_for_inference+channels_last"] = (
            optimise_for_device(weights, torch.device("cpu"), True), last)
    with torch.inference_mode():
        return {name: timed_rate(_cycling(module, prepared), batch, seconds, 200)
                for name, (module, prepared) in variants.items()}


def _cycling(function, argument_tuples: list[tuple]):
    """A step that calls `function` on each argument tuple in turn."""
    position = iter(range(10**9))
    return lambda: function(*argument_tuples[next(position) % len(argument_tuples)])


def preprocessing_share(inputs: Inputs, model_rate_per_item: float, seconds: float) -> dict:
    """Decode + resize time of a 1000x750 JPEG against the per-item handler time."""
    size = inputs.settings.image.size
    cycle = iter(range(10**9))
    with_draft = timed_rate(lambda: model_image_from_bytes(inputs.photo(next(cycle) % 8), size),
                            1, seconds, 500)
    full = timed_rate(lambda: image_to_tensor(fit_to_square(decode_image(inputs.photo(next(cycle) % 8)),
                                                            size)), 1, seconds, 500)
    pre, infer = 1 / with_draft, 1 / model_rate_per_item
    return {"decode_resize_ms": 1000 * pre, "decode_resize_full_size_ms": 1000 / full,
            "model_ms_per_item": 1000 * infer, "share_of_handler_time": pre / (pre + infer)}


def naive_baseline(model: str, checkpoint: Path, inputs: Inputs, threads: int, seconds: float) -> float:
    """The original study's service: eager model, one request at a time, full-size decoding,
    text padded to 200 tokens."""
    from marketplace_classifier.training.checkpoints import load_checkpoint

    torch.set_num_threads(threads)
    eager, _ = load_checkpoint(checkpoint)
    size = inputs.settings.image.size if inputs.kind.uses_image else None
    cycle = iter(range(10**9))

    def one() -> None:
        index = next(cycle) % len(inputs.requests)
        tensors = []
        if size:
            tensors.append(image_to_tensor(fit_to_square(decode_image(inputs.photo(index)), size))[None])
        if inputs.kind.uses_text:
            encoded = inputs.tokenizer([free_text(inputs.text(index))], padding="max_length",
                                       truncation=True, max_length=NAIVE_TEXT_TOKENS, return_tensors="pt")
            tensors += [encoded["input_ids"], encoded["attention_mask"]]
            lexical = inputs.settings.text.lexical
            if lexical:
                tensors += lexical_batch([free_text(inputs.text(index))], lexical)
        with torch.inference_mode():
            eager(*tensors)

    return timed_rate(one, 1, seconds, 500)


def run(artifacts: Path, checkpoints: Path, out: Path, scale: float = 1.0,
        models: tuple[str, ...] = MODELS) -> dict:
    for model in models:
        for needed in (ExportLayout(artifacts / model).model, checkpoints / model / "best.pt"):
            if not needed.exists():
                raise FileNotFoundError(f"{needed} not found: run `make demo` (or train and export) first")
    if shutil.which("java") is None:
        raise RuntimeError("java not found: the served benchmark needs TorchServe (Java 17)")
    workers = MODEL_CONFIG["minWorkers"]
    threads = max(1, (os.cpu_count() or 1) // workers)
    batch = MODEL_CONFIG["batchSize"]
    seconds = 2.0 * scale
    requests_per_run = max(8, int(96 * scale))
    report = {"date": datetime.now(UTC).strftime("%Y-%m-%d"),
              "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU used",
              "workers": workers, "other_workers": other_worker_count(workers),
              "threads_per_worker": threads, "configured_batch_size": batch,
              "max_batch_delay_ms": MODEL_CONFIG["maxBatchDelay"], "models": {}}
    variants = [v for v in ("text_int8", "combined_int8") if ExportLayout(artifacts / v).model.exists()
                and v.removesuffix("_int8") in models]
    steps = Steps("bench", 3 * len(models) + 3 + int(bool(variants)))
    for model in models:
        steps(f"{model}: model limit at batch sizes {', '.join(map(str, BATCH_SIZES))}")
        inputs = Inputs(model, artifacts / model, 16)
        limit = model_limit(model, artifacts / model, inputs, threads, seconds)
        # the naive service was one process using every core
        steps(f"{model}: the naive service")
        naive = naive_baseline(model, checkpoints / model / "best.pt", inputs, os.cpu_count() or 1, seconds)
        report["models"][model] = {"model_limit": limit, "naive": naive}
        steps(f"{model}: optimisations with and without")
        report["models"][model]["layouts"] = layout_trials(model, artifacts / model, inputs, threads,
                                                           seconds, batch)
        if inputs.kind is IMAGE:
            report["image_preprocessing"] = preprocessing_share(inputs, limit[batch], seconds)
    steps(f"served by TorchServe at concurrency {', '.join(map(str, CONCURRENCY))}")
    on = served(list(models), artifacts, MODEL_CONFIG, requests_per_run, CONCURRENCY, 60 * scale)
    steps("served with batching off")
    off = served(list(models), artifacts, MODEL_CONFIG | {"batchSize": 1, "maxBatchDelay": 0},
                 requests_per_run, (16,), 60 * scale)
    # the other way of sharing the cores: one worker with all of them, or one per core
    other = other_worker_count(workers)
    steps(f"served by {other} worker(s) per model")
    split = served(list(models), artifacts, MODEL_CONFIG | {"minWorkers": other, "maxWorkers": other},
                   requests_per_run, (16,), 60 * scale)
    for model in models:
        report["models"][model]["served"] = on[model]
        report["models"][model]["batching_off"] = off[model][16]
        report["models"][model]["other_workers"] = split[model][16]
    if variants:  # opt-in exports (`marketplace-classifier export --int8`), served beside the fp32 ones
        steps(f"int8 variants served beside fp32: {', '.join(variants)}")
        pairs = served([*variants, *(v.removesuffix("_int8") for v in variants)], artifacts, MODEL_CONFIG,
                       requests_per_run, (16,), 60 * scale)
        report["int8_served"] = {v: {"int8": pairs[v][16], "fp32": pairs[v.removesuffix("_int8")][16]}
                                 for v in variants}
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report(report, out)
    steps.done()
    return report


def main(argv: list[str] | None = None) -> int:
    # TorchScript is what TorchServe loads; torch 2.14's deprecation notes are only noise here
    warnings.filterwarnings("ignore", message="`torch.jit", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--checkpoint-dir", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmark")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies durations and request counts")
    args = parser.parse_args(argv)
    return reported(lambda: run(args.artifacts_dir, args.checkpoint_dir, args.out, args.scale), markdown,
                    f"{args.out}/benchmark.json, benchmark.md, benchmark.png")


if __name__ == "__main__":
    raise SystemExit(main())
