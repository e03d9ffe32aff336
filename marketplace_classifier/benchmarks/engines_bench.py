"""Both engines in one run, with the same harness and the same inputs: install size, cold start,
memory with the three models, and served items/s and p99 at concurrency 1, 4 and 16 per model.

Usage: python -m marketplace_classifier.benchmarks.engines_bench [--artifacts-dir artifacts] [--seconds 15]
[--out reports/engines]
       [--engines torchserve kserve_ray] [--data-dir data/real]
Each engine serves the same exported folders with 2 workers (replicas) per model, one thread
each, batches of up to 4 gathered for 10 ms; both get KServe v1 bodies (one listing: a
1000x750 photo and/or a text). With both engines it also checks that they answer the same
listings with the same probabilities (the largest difference is in the table). Writes engines.json
and engines.md under --out. `make bench ENGINE=kserve_ray` runs it for the second engine alone.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from marketplace_classifier.benchmarks.harness import missing_exports, temporary_server, torchserve_frontend
from marketplace_classifier.benchmarks.load import run_load, sample_photo, sample_text
from marketplace_classifier.ops import serve
from marketplace_classifier.ops.engines import KServeRay, TorchServe
from marketplace_classifier.ops.hostile import v1
from marketplace_classifier.serving.config import MODEL_CONFIG
from marketplace_classifier.serving.model_kinds import MODEL_KINDS, model_kind

ROOT = serve.ROOT
CONCURRENCIES = (1, 4, 16)
MIB = 1024 * 1024
ENGINES = {engine.name: engine.title for engine in (TorchServe, KServeRay)}
COMPARED_LISTINGS = 32  # per model, answered by both engines


def v1_payload(listing: dict) -> dict:
    """One listing as a KServe v1 request for marketplace_classifier/benchmarks/load.py."""
    return {"data": v1([listing]), "headers": {"Content-Type": "application/json"}}


def v1_payloads(model: str, count: int, seed: int = 0) -> list[dict]:
    """KServe v1 bodies of one generated listing each, with what the model takes."""
    rng, kind, payloads = random.Random(seed), model_kind(model), []
    for _ in range(count):
        listing = {"image": base64.b64encode(sample_photo(rng)).decode()} if kind.uses_image else {}
        listing |= {"text": sample_text(rng)} if kind.uses_text else {}
        payloads.append(v1_payload(listing))
    return payloads


def folder_mib(*paths: Path) -> int:
    files = [file for path in paths if path.exists()
             for file in ([path] if path.is_file() else path.rglob("*"))]
    return round(sum(file.stat().st_size for file in files if file.is_file() and not file.is_symlink()) / MIB)


def install_sizes() -> dict:
    """What each engine adds beside torch (both need it): TorchServe's packages and the JRE, and
    the second engine's environment without torch and its CUDA libraries."""
    main = ROOT / ".venv" / "lib" / "python3.11" / "site-packages"
    engine = ROOT / ".venv-engine" / "lib" / "python3.11" / "site-packages"
    java = Path(shutil.which("java") or "/usr/bin/java").resolve().parents[1]
    torch_parts = [engine / name for name in ("torch", "triton")] + sorted(engine.glob("nvidia*")) + \
        sorted(engine.glob("cuda*"))
    return {"torchserve": folder_mib(main / "ts", main / "model_archiver", java),
            "kserve_ray": folder_mib(engine) - folder_mib(*torch_parts)}


def tree_rss_mib(root: psutil.Process) -> int:
    processes = [root, *root.children(recursive=True)]
    return round(sum(process.memory_info().rss for process in processes if process.is_running()) / MIB)


@contextmanager
def kserve_ray(artifacts: Path):
    """The second engine on a free port; yields (v1 URL pattern, its driver process)."""
    port, state = serve.free_port(span=3), Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        with KServeRay(state, artifacts, port=port) as engine:
            yield f"{engine.addresses.rest}/v1/models/{{model}}:predict", psutil.Process(engine.addresses.pid)
    finally:
        shutil.rmtree(state, ignore_errors=True)


@contextmanager
def torchserve(artifacts: Path, models: list[str]):
    with temporary_server(artifacts, models, MODEL_CONFIG) as (properties, state):
        yield (properties["inference_address"] + "/predictions/{model}",
               serve.read_key(state / "key_file.json"), state)


def load_models(url: str, token: str | None, models: list[str], seconds: float) -> dict:
    results = {}
    for model in models:
        payloads = v1_payloads(model, 64)
        target = url.format(model=model)
        for concurrency in CONCURRENCIES:
            run_load(target, token, payloads[:concurrency], concurrency, seconds)  # warm-up
            stream = [payloads[i % len(payloads)] for i in range(4000)]
            results.setdefault(model, {})[concurrency] = run_load(target, token, stream, concurrency, seconds)
            print(json.dumps({"model": model, "concurrency": concurrency} | results[model][concurrency]),
                  file=sys.stderr, flush=True)
    return results


def held_out_listings(data_dir: Path, count: int) -> list[dict]:
    """The first `count` test-split listings with photos of a cleaned folder: up to 4 photos
    (base64) and the text of each, for the comparison of the engines' answers."""
    from marketplace_classifier.serving.model_kinds import COMBINED
    from marketplace_classifier.training.data import CleanData

    data = CleanData.load(data_dir)
    photos = data.samples(COMBINED, "test").groupby("product_id", sort=False)["id"].apply(list)
    texts = dict(zip(data.products["id"], data.products["text"], strict=True))
    return [{"images": [base64.b64encode(data.image_path(i).read_bytes()).decode() for i in ids[:4]],
             "text": texts[product]} for product, ids in list(photos.items())[:count]]


def compared_payloads(model: str, listings: list[dict] | None) -> list[dict]:
    """The bodies both engines answer: held-out listings (only what the model takes), or
    generated ones (seed 1) without a cleaned folder."""
    if listings is None:
        return v1_payloads(model, COMPARED_LISTINGS, seed=1)
    kind = model_kind(model)
    taken = [key for key, used in (("images", kind.uses_image), ("text", kind.uses_text)) if used]
    return [v1_payload({key: listing[key] for key in taken}) for listing in listings]


def listing_answers(url: str, token: str | None, models: list[str], listings: list[dict] | None = None
                    ) -> dict[str, list[dict]]:
    """Each model's probabilities for the same listings (compared_payloads), one request each."""
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answers = {}
    for model in models:
        answers[model] = []
        for payload in compared_payloads(model, listings):
            response = requests.post(url.format(model=model), data=payload["data"], timeout=120,
                                     headers=headers | payload["headers"])
            response.raise_for_status()
            answers[model].append(response.json()["predictions"][0]["probabilities"])
    return answers


def largest_difference(first: list[dict], second: list[dict]) -> float:
    """The largest difference of one category's probability between two engines' answers."""
    return max(abs(a[name] - b[name]) for a, b in zip(first, second, strict=True) for name in a)


def measure_engine(engine: str, artifacts: Path, models: list[str], seconds: float,
                   listings: list[dict] | None = None) -> dict:
    started = time.monotonic()
    if engine == "torchserve":
        with torchserve(artifacts, models) as (url, token, state):
            ready = time.monotonic() - started
            answers = listing_answers(url, token, models, listings)
            served = load_models(url, token, models, seconds)
            rss = tree_rss_mib(torchserve_frontend(state))
    else:
        with kserve_ray(artifacts) as (url, root):
            ready = time.monotonic() - started
            answers = listing_answers(url, None, models, listings)
            served = load_models(url, None, models, seconds)
            rss = tree_rss_mib(root)
    return {"cold_start_s": round(ready, 1), "rss_mib": rss, "served": served, "answers": answers}


def run(artifacts: Path, models: list[str], seconds: float, engines: tuple[str, ...] = tuple(ENGINES),
        data_dir: Path | None = None) -> dict:
    """Every engine in turn; with a cleaned folder `data_dir`, the answers are compared on its
    held-out listings, otherwise on generated ones."""
    listings = held_out_listings(data_dir, COMPARED_LISTINGS) if data_dir else None
    compared = f"{len(listings)} test listings of {data_dir}" if listings else \
        f"{COMPARED_LISTINGS} generated listings"
    report = {"install_mib": install_sizes(), "engines": {}, "compared_on": compared}
    for engine in engines:
        report["engines"][engine] = measure_engine(engine, artifacts, models, seconds, listings)
    if len(engines) == 2:
        first, second = (report["engines"][engine]["answers"] for engine in engines)
        report["largest_answer_difference"] = {model: largest_difference(first[model], second[model])
                                               for model in models}
    return report


def markdown(report: dict, models: list[str]) -> str:
    engines = report["engines"]
    names = list(engines)
    notes = {"torchserve": " (packages + Java 17)", "kserve_ray": ""}
    lines = [f"| | {' | '.join(ENGINES[name] for name in names)} |", "|---|" + "---|" * len(names),
             "| install beside torch (MiB) | "
             + " | ".join(f"{report['install_mib'][name]}{notes[name]}" for name in names) + " |",
             f"| cold start, {len(models)} models (s) | "
             + " | ".join(str(engines[name]["cold_start_s"]) for name in names) + " |",
             "| RSS after the run, all processes (MiB) | "
             + " | ".join(str(engines[name]["rss_mib"]) for name in names) + " |"]
    for model in models:
        for concurrency in CONCURRENCIES:
            cells = [engines[name]["served"][model][concurrency] for name in names]
            shown = [f"{cell['throughput']}, {cell['p99_ms']:.0f}" +
                     (f" ({cell['errors']} errors)" if cell["errors"] else "") for cell in cells]
            lines.append(f"| {model}, c={concurrency}: items/s, p99 ms | {' | '.join(shown)} |")
    if "largest_answer_difference" in report:
        differences = ", ".join(f"{model} {value:.1e}"
                                for model, value in report["largest_answer_difference"].items())
        lines.append(f"| the same {report['compared_on']}: largest probability difference | "
                     f"{differences} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--seconds", type=float, default=15, help="per model and concurrency")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "engines")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--data-dir", type=Path,
                        help="a cleaned folder whose test listings both engines answer (default: "
                             "generated listings)")
    args = parser.parse_args(argv)
    models = list(MODEL_KINDS)
    error = missing_exports(args.artifacts_dir, models)
    if not error and "kserve_ray" in args.engines and not serve.ENGINE_PYTHON.exists():
        error = "error: the second engine's environment is missing: make engine-venv"
    if error:
        print(error, file=sys.stderr)
        return 2
    report = run(args.artifacts_dir.resolve(), models, args.seconds, tuple(args.engines), args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engines.json").write_text(json.dumps(report, indent=2))
    (args.out / "engines.md").write_text(markdown(report, models))
    print(markdown(report, models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
