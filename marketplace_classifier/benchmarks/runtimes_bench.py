"""Old runtime against new, served side by side: every model under TorchScript and under the runtime
its export chose, on the same TorchServe configuration, with the server's CPU time per answered
item, the machine's peak, each model's FLOPs and, given the data, test accuracy per listing.

Usage: python -m marketplace_classifier.benchmarks.runtimes_bench [--artifacts-dir artifacts/real]
[--data-dir data/real]
       [--models image text combined] [--seconds 60] [--out reports/runtimes]
`make bench` runs it after the served benchmark; the figures are in docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from marketplace_classifier.benchmarks.harness import missing_exports, reported, temporary_server
from marketplace_classifier.benchmarks.load import make_request, run_load
from marketplace_classifier.benchmarks.model_speed import calls_per_second
from marketplace_classifier.ops import serve
from marketplace_classifier.progress import Steps
from marketplace_classifier.serving.config import MODEL_CONFIG
from marketplace_classifier.serving.core import ListingService, Request, ServingOptions
from marketplace_classifier.serving.exported import ExportedModel
from marketplace_classifier.serving.model_kinds import MODEL_KINDS
from marketplace_classifier.serving.processing import model_image_from_bytes
from marketplace_classifier.serving.settings import ONNXRUNTIME, OPENVINO, TORCHSCRIPT

ROOT = serve.ROOT
CONCURRENCY = 16
MATMUL_SIZE = 2048
PROFILE_BATCH = 4


# ------------------------------------------------------------------ the machine and the models
def peak_gflops(runtime: str, seconds: float = 3.0, size: int = MATMUL_SIZE, bf16: bool = False) -> float:
    """GFLOP/s of one core multiplying two float32 [size, size] matrices in `runtime` (in bfloat16
    under OpenVINO when `bf16`)."""
    first, second = torch.randn(size, size), torch.randn(size, size)
    if runtime == TORCHSCRIPT:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return 2 * size**3 * calls_per_second(torch.mm, (first, second), seconds) / 1e9
        finally:
            torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        program = _matmul_program(Path(folder) / "matmul.onnx", size)
        from marketplace_classifier.serving.runtimes import OnnxMethod

        method = OnnxMethod(program, runtime, threads=1, bf16=bf16)
        return 2 * size**3 * calls_per_second(method, (first, second), seconds) / 1e9


def peaks() -> dict[str, float]:
    """Each runtime's peak GFLOP/s on one core, and OpenVINO's in bfloat16 where the CPU has it."""
    from marketplace_classifier.serving.runtimes import bf16_supported

    figures = {name: round(peak_gflops(name), 1) for name in (TORCHSCRIPT, ONNXRUNTIME, OPENVINO)}
    if bf16_supported():
        figures[f"{OPENVINO} bf16"] = round(peak_gflops(OPENVINO, bf16=True), 1)
    return figures


def _matmul_program(path: Path, size: int) -> Path:
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [size, size]) for name in "ab"]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [size, size])
    node = helper.make_node("MatMul", ["a", "b"], ["logits"])
    graph = helper.make_graph([node], "matmul", inputs, [output])
    # IR version 8 (opset 17's): onnx 1.23 writes a newer one by default than ONNX Runtime 1.30 reads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def flops_per_item(folder: Path, requests: list[dict]) -> float:
    """FLOPs of the TorchScript per served item (a photo row with its text, or a text), counted
    by torch's FLOP counter on the benchmark's own requests (the ONNX programs are the same graph)."""
    from torch.utils.flop_counter import FlopCounterMode

    exported = ExportedModel.load(folder, runtime=TORCHSCRIPT)
    inputs = exported.inputs(*_decoded(exported, requests))
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        exported.model(*inputs)
    return counter.get_total_flops() / len(requests)


def _decoded(exported: ExportedModel, requests: list[dict]) -> tuple[list | None, list | None]:
    images = texts = None
    if exported.kind.uses_image:
        photos = [request["files"]["image"][1] if "files" in request else request["data"]
                  for request in requests]
        images = [model_image_from_bytes(photo, exported.settings.image.size) for photo in photos]
    if exported.kind.uses_text:
        texts = [request["data"]["text"] if "files" in request else request["data"].decode()
                 for request in requests]
    return images, texts


# ------------------------------------------------------------------ served, with the server's CPU time
def server_processes(state: Path) -> list[psutil.Process]:
    """The TorchServe frontend started in `state` and every process below it (its workers)."""
    frontends = [process for process in psutil.process_iter(["name", "cwd"])
                 if process.info["name"] == "java" and process.info["cwd"] == str(state.resolve())]
    if not frontends:
        raise RuntimeError(f"no TorchServe frontend found running in {state}")
    return [frontends[0], *frontends[0].children(recursive=True)]


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds of each process (/proc/<pid>/stat), by pid."""
    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def served_with_cpu(runtime: str | None, models: list[str], artifacts: Path, seconds: float,
                    requests_per_run: int) -> dict:
    """Items/s, latency and server CPU-ms per answered item at CONCURRENCY, per model, with every
    archive's handler on `runtime` (None: the runtime each export chose)."""
    handler = MODEL_CONFIG["handler"] | ({"runtime": runtime} if runtime else {})
    results = {}
    with temporary_server(artifacts, models, MODEL_CONFIG | {"handler": handler}) as (properties, state):
        token = serve.read_key(state / "key_file.json")
        for model in models:
            rng = random.Random(1)
            distinct = [make_request(model, rng) for _ in range(16)]
            payloads = [distinct[i % 16] for i in range(requests_per_run)]
            url = f"{properties['inference_address']}/predictions/{model}"
            run_load(url, token, payloads[:CONCURRENCY], CONCURRENCY, seconds)  # warm-up
            processes = server_processes(state)
            before = cpu_seconds(processes)
            load = run_load(url, token, payloads, CONCURRENCY, seconds)
            after = cpu_seconds(processes)
            used = sum(after[pid] - before[pid] for pid in after if pid in before)
            answered = load["requests"] - load["errors"]
            results[model] = load | {"server_cpu_seconds": round(used, 2),
                                     "server_cpu_ms_per_item": round(1000 * used / max(answered, 1), 1)}
    return results


# ------------------------------------------------------------------ one worker's stages
class _TimedService(ListingService):
    """A ListingService that adds up the time its model calls take."""

    model_seconds = 0.0

    def run(self, method, inputs):
        started = time.perf_counter()
        try:
            return super().run(method, inputs)
        finally:
            self.model_seconds += time.perf_counter() - started


def stage_profile(folder: Path, runtime: str | None, requests: list[dict], rounds: int = 8) -> dict:
    """Milliseconds per item of one worker (one thread), per stage: parsing and photo decoding,
    tokenizing and collating, the model, and building the answers."""
    torch.set_num_threads(1)
    service = _TimedService(folder, ServingOptions(runtime=runtime or "", threads=1))
    batch = [_core_request(request) for request in requests[:PROFILE_BATCH]]
    totals = {"parse_and_decode": 0.0, "tokenize_and_collate": 0.0, "model": 0.0, "answer": 0.0}
    service.handle(batch)  # warm-up
    for _ in range(rounds):
        service.model_seconds = 0.0
        started = time.perf_counter()
        prepared = service.prepare(batch)
        decoded = time.perf_counter()
        service.predict(prepared)
        predicted = time.perf_counter()
        service.answer(prepared)
        answered = time.perf_counter()
        totals["parse_and_decode"] += decoded - started
        totals["model"] += service.model_seconds
        totals["tokenize_and_collate"] += predicted - decoded - service.model_seconds
        totals["answer"] += answered - predicted
    items = rounds * len(batch)
    return {stage: round(1000 * total / items, 2) for stage, total in totals.items()}


def _core_request(request: dict) -> Request:
    if "files" in request:
        return Request({"image": request["files"]["image"][1], "text": request["data"]["text"].encode()})
    return Request({"body": request["data"]}, request["headers"]["Content-Type"])


# ------------------------------------------------------------------ test accuracy per listing
@torch.inference_mode()
def test_accuracy(folder: Path, runtime: str | None, data_dir: Path) -> float:
    """Accuracy per listing on the test split of a cleaned folder, in process under `runtime`."""
    from marketplace_classifier.training.data import CleanData
    from marketplace_classifier.training.export_runtimes import pooled_accuracy
    from marketplace_classifier.training.features import load_model_image

    exported = ExportedModel.load(folder, runtime=runtime, threads=torch.get_num_threads())
    data = CleanData.load(data_dir)
    samples = data.samples(exported.kind, "test")
    logits = []
    for start in range(0, len(samples), 16):
        chosen = samples.iloc[start:start + 16]
        images = [load_model_image(data.image_path(i), exported.settings.image.size) for i in chosen["id"]] \
            if exported.kind.uses_image else None
        texts = list(chosen["text"]) if exported.kind.uses_text else None
        logits.append(exported.model(*exported.inputs(images, texts)))
    return pooled_accuracy(logits, samples, exported.kind, exported.settings.num_classes)


# ------------------------------------------------------------------ the run and its report
def run(artifacts: Path, models: list[str], seconds: float, out: Path, data_dir: Path | None = None,
        requests_per_run: int = 400) -> dict:
    chosen = {model: ExportedModel.load(artifacts / model, runtime=TORCHSCRIPT).settings for model in models}
    report = {"date": time.strftime("%Y-%m-%d"), "cores": psutil.cpu_count(), "concurrency": CONCURRENCY,
              "workers": MODEL_CONFIG["minWorkers"], "peak_gflops_one_core": peaks(), "models": {}}
    rng = random.Random(2)
    steps = Steps("bench-runtimes", len(models) * (1 + int(data_dir is not None)) + 2)
    for model in models:
        steps(f"{model}: FLOPs and the worker's stages under each runtime")
        requests = [make_request(model, rng) for _ in range(8)]
        settings = chosen[model]
        report["models"][model] = {
            "runtime": settings.runtime_label,
            "gflops_per_item": round(flops_per_item(artifacts / model, requests) / 1e9, 3),
            "export_choice": settings.runtime_choice,
            "stages_ms_per_item": {"old": stage_profile(artifacts / model, TORCHSCRIPT, requests),
                                   "new": stage_profile(artifacts / model, None, requests)}}
        if data_dir is not None:
            steps(f"{model}: test accuracy per listing under each runtime")
            report["models"][model]["test_listing_accuracy"] = {
                "old": round(test_accuracy(artifacts / model, TORCHSCRIPT, data_dir), 4),
                "new": round(test_accuracy(artifacts / model, None, data_dir), 4)}
    steps(f"served as {TORCHSCRIPT} at concurrency {CONCURRENCY}")
    old = served_with_cpu(TORCHSCRIPT, models, artifacts, seconds, requests_per_run)
    steps(f"served under the runtime each export chose, at concurrency {CONCURRENCY}")
    new = served_with_cpu(None, models, artifacts, seconds, requests_per_run)
    for model in models:
        report["models"][model]["served"] = {"old": old[model], "new": new[model]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtimes.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "runtimes.md").write_text(markdown(report) + "\n")
    steps.done()
    return report


def markdown(report: dict) -> str:
    cores, peaks_by_runtime = report["cores"], report["peak_gflops_one_core"]
    peaks = ", ".join(f"{name} {rate} GFLOP/s" for name, rate in peaks_by_runtime.items())
    lines = [f"Served at concurrency {report['concurrency']} on {cores} cores "
             f"({report['workers']} workers per model, one thread each); peak of one core, a large "
             f"matmul (float32 unless named): {peaks}.", "",
             "| model | runtime | items/s | p99 ms | server CPU-ms per item | speed-up | GFLOP per item "
             "| GFLOP/s served | share of the cores' peak | test accuracy per listing |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, figures in report["models"].items():
        old, new = figures["served"]["old"], figures["served"]["new"]
        accuracy = figures.get("test_listing_accuracy", {})
        for label, served, runtime in (("old", old, TORCHSCRIPT), ("new", new, figures["runtime"])):
            achieved = figures["gflops_per_item"] * served["throughput"]
            # a bf16 variant against bf16's peak, an int8 one against its runtime's float32 peak
            peak = peaks_by_runtime.get(runtime, peaks_by_runtime[runtime.split()[0]]) * cores
            speedup = f"{served['throughput'] / old['throughput']:.2f}x" if label == "new" else ""
            lines.append(f"| {model} | {runtime} | {served['throughput']} | {served['p99_ms']} | "
                         f"{served['server_cpu_ms_per_item']} | {speedup} | {figures['gflops_per_item']} | "
                         f"{achieved:.1f} | {achieved / peak:.1%} | {accuracy.get(label, 'n/a')} |")
    lines += ["", "Milliseconds per item of one worker (one thread, batches of "
              f"{PROFILE_BATCH}), old -> new:", "",
              "| model | parse and decode | tokenize and collate | model | answer |", "|---|---|---|---|---|"]
    for model, figures in report["models"].items():
        old, new = figures["stages_ms_per_item"]["old"], figures["stages_ms_per_item"]["new"]
        lines.append(f"| {model} | " + " | ".join(f"{old[stage]} -> {new[stage]}" for stage in old) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--data-dir", type=Path,
                        help="a cleaned, split folder: also test accuracy per listing")
    parser.add_argument("--models", nargs="+", choices=MODEL_KINDS, default=list(MODEL_KINDS))
    parser.add_argument("--seconds", type=float, default=60.0, help="longest load run per model and runtime")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "runtimes")
    args = parser.parse_args(argv)
    error = missing_exports(args.artifacts_dir, args.models)
    if error:
        print(error, file=sys.stderr)
        return 2
    return reported(lambda: run(args.artifacts_dir, args.models, args.seconds, args.out, args.data_dir),
                    markdown, f"{args.out}/runtimes.json and runtimes.md")


if __name__ == "__main__":
    raise SystemExit(main())
