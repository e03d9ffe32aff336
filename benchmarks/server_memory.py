"""Memory of a whole TorchServe (frontend JVM and every worker) serving archives, after warm-up
requests: what a container's memory request and limit must hold.

Usage: python -m benchmarks.server_memory [--model-store model_store] [--requests 8]
Starts a server from config.properties on free ports, prints one JSON line (MiB), stops it.
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

from benchmarks.load import make_request, post_payload
from scripts import serve
from serving.model_kinds import MODEL_KINDS

ROOT = serve.ROOT


def server_rss_mib(state_dir: Path) -> dict:
    """RSS of the frontend (the java process started from state_dir) and its worker processes."""
    frontends = [p for p in psutil.process_iter(["name", "cwd"]) if p.info["name"] == "java"
                 and p.info["cwd"] == str(state_dir)]
    if not frontends:
        raise RuntimeError(f"no TorchServe frontend found running in {state_dir}")
    frontend = frontends[0]
    workers = frontend.children(recursive=True)
    mib = 1024 * 1024
    front, behind = frontend.memory_info().rss, sum(w.memory_info().rss for w in workers)
    return {"frontend_mib": round(front / mib), "workers": len(workers),
            "workers_mib": round(behind / mib), "total_mib": round((front + behind) / mib)}


def measure(model_store: Path, models: list[str], requests_per_model: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        config, state = Path(folder) / "config.properties", Path(folder) / "state"
        properties = serve.loopback_config(config, {
            "model_store": str(model_store.resolve()), "load_models": ",".join(f"{m}.mar" for m in models)})
        started = time.monotonic()
        try:
            serve.start(config, model_store, state, timeout=600)
            ready_seconds = time.monotonic() - started
            at_start = server_rss_mib(state.resolve())
            token = serve.read_key(state / "key_file.json")
            rng, answered, headers = random.Random(0), 0, {"Authorization": f"Bearer {token}"}
            for model in models:
                url = f"{properties['inference_address']}/predictions/{model}"
                answered += sum(post_payload(url, headers, make_request(model, rng))
                                for _ in range(requests_per_model))
            return {"models": models, "ready_seconds": round(ready_seconds, 1), "at_start": at_start,
                    "after_requests": server_rss_mib(state.resolve()), "answered": answered}
        finally:
            serve.stop(state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--model", nargs="+", default=list(MODEL_KINDS))
    parser.add_argument("--requests", type=int, default=8, help="warm-up requests per model")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(measure(args.model_store, args.model, args.requests)))
    except (serve.ServeError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
