"""The load harness shared by the benchmark, the soak test and the tuning grid: a temporary
TorchServe serving fresh archives, and its served throughput per model and concurrency."""

from __future__ import annotations

import random
import tempfile
from contextlib import contextmanager
from pathlib import Path

from marketplace_classifier.benchmarks.load import make_request, run_load
from marketplace_classifier.ops import serve
from marketplace_classifier.ops.archive import build_archive
from marketplace_classifier.ops.engines import TorchServe
from marketplace_classifier.serving.layout import ExportLayout

ROOT = serve.ROOT


def missing_exports(artifacts: Path, models: list[str]) -> str | None:
    """A one-line error naming the models `artifacts` has no export of, or None."""
    missing = [model for model in models if not ExportLayout(artifacts / model).model.exists()]
    if not missing:
        return None
    return (f"error: {artifacts} has no exported {', '.join(missing)} model "
            "(run `make demo` or `marketplace-classifier export`)")


def reported(work, markdown, written: str) -> int:
    """Run a benchmark (`work()` returns its report) for a command line: print its markdown and
    where it was written, or one error line and exit status 2."""
    import sys

    try:
        report = work()
    except (FileNotFoundError, RuntimeError, serve.ServeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(report))
    print(f"written to {written}")
    return 0


def torchserve_frontend(state: Path):
    """The TorchServe frontend (java) started from the state folder `state`."""
    import psutil

    for process in psutil.process_iter(["name", "cwd"]):
        if process.info["name"] == "java" and process.info["cwd"] == str(state.resolve()):
            return process
    raise RuntimeError(f"no TorchServe frontend found running in {state}")


@contextmanager
def temporary_server(artifacts: Path, models: list[str], model_config: dict):
    """A TorchServe from the project's config.properties serving fresh archives of `models`;
    yields (properties, state folder) and stops the server whatever happens."""
    project = artifacts.resolve().parent  # the archive builder keeps to the artifacts' project
    with tempfile.TemporaryDirectory(dir=project) as folder:
        store, state = Path(folder) / "model_store", Path(folder) / "state"
        for model in models:
            build_archive(model, artifacts, store, root=project, model_config=model_config)
        config = Path(folder) / "config.properties"
        serve.derive_config(ROOT / "config.properties", config,
                            {"load_models": ",".join(m + ".mar" for m in models)})
        with TorchServe(state, config, store, timeout=300):
            yield serve.read_properties(config), state


def served(models: list[str], artifacts: Path, model_config: dict, requests_per_run: int,
           concurrencies: tuple[int, ...], max_seconds: float) -> dict:
    """Served throughput and latency per model and concurrency, over REST."""
    results: dict = {}
    with temporary_server(artifacts, models, model_config) as (properties, state):
        token = serve.read_key(state / "key_file.json")
        for model in models:
            rng = random.Random(1)
            distinct = [make_request(model, rng) for _ in range(16)]
            url = f"{properties['inference_address']}/predictions/{model}"
            for concurrency in concurrencies:
                payloads = [distinct[i % 16] for i in range(max(requests_per_run, concurrency))]
                run_load(url, token, payloads[:concurrency], concurrency, max_seconds)  # warm-up
                results.setdefault(model, {})[concurrency] = run_load(
                    url, token, payloads, concurrency, max_seconds)
    return results
