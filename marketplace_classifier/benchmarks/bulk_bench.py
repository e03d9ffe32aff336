"""Bulk scoring's three ways on one set of real listings: the model alone (its inputs decoded
beforehand: the ceiling), in-process (`marketplace-classifier score`: reading, decoding, the
model, writing), through TorchServe with the client, and on Ray Data over a two-node local
cluster. Writes reports/<out>/bulk.json and bulk.md (the table docs/benchmark.md includes).

Usage: python -m marketplace_classifier.benchmarks.bulk_bench --input ../shared/data/marketplace
           --artifacts-dir artifacts/real --model-store model_store/real [--listings 300] [--model combined]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from marketplace_classifier.client import Client
from marketplace_classifier.ops import serve
from marketplace_classifier.ops.bulk import BulkRun, InProcessScorer, ServedScorer, listing_parts
from marketplace_classifier.ops.bulk_io import csv_records, read_rows
from marketplace_classifier.ops.bulk_ray import local_cluster, score_on_cluster
from marketplace_classifier.ops.engines import TorchServe
from marketplace_classifier.serving.core import Request
from marketplace_classifier.serving.payloads import DEFAULT_MAX_PHOTOS

BATCH = 16


def subset_export(source: Path, listings: int, folder: Path) -> Path:
    """The first `listings` products of an export that have photos, as an export of their own
    (photos linked, not copied)."""
    import csv

    images = list(csv_records(source / "Images.csv"))
    with_photos = {record["product_id"] for record in images}
    products = [record for record in csv_records(source / "Products.csv") if record.get("id") in with_photos]
    kept = products[:listings]
    ids = {record["id"] for record in kept}
    mine = [record for record in images if record["product_id"] in ids]
    (folder / "images").mkdir(parents=True)
    for name, rows in (("Products.csv", kept), ("Images.csv", mine)):
        with (folder / name).open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    for record in mine:
        photo = source / "images" / f"{record['id']}.jpg"
        if photo.exists():
            os.symlink(photo.resolve(), folder / "images" / photo.name)
    return folder


def model_alone(export: Path, model_dir: Path) -> dict:
    """Listings/s of the model's batches with their inputs prepared beforehand (untimed)."""
    scorer = InProcessScorer(model_dir)
    listings = [
        row.listing(DEFAULT_MAX_PHOTOS) for row in read_rows(export) if row.photos or row.product_name
    ]
    batches = [
        scorer.service.prepare(
            [
                Request(listing_parts(listing), "multipart/form-data")
                for listing in listings[start : start + BATCH]
            ]
        )
        for start in range(0, len(listings), BATCH)
    ]
    scorer.service.predict(batches[0])  # warm: a runtime's first call compiles and allocates
    started = time.perf_counter()
    for batch in batches:
        scorer.service.predict(batch)
    seconds = time.perf_counter() - started
    return {
        "listings": len(listings),
        "seconds": round(seconds, 1),
        "listings_per_second": len(listings) / seconds,
    }


def timed_run(export: Path, out: Path, model: str, scorer, concurrency: int) -> dict:
    scorer.score([next(read_rows(export)).listing(DEFAULT_MAX_PHOTOS)])  # warm, untimed
    started = time.perf_counter()
    counts = BulkRun(export, out, model, scorer, BATCH, concurrency, progress=False).run()
    seconds = time.perf_counter() - started
    return {
        "listings": counts["listings"],
        "errors": counts["errors"],
        "seconds": round(seconds, 1),
        "listings_per_second": counts["listings"] / seconds,
        "concurrency": concurrency,
    }


def served(export: Path, work: Path, model: str, model_store: Path) -> dict:
    config = work / "config.properties"
    serve.loopback_config(config, {"model_store": str(model_store.resolve())})
    with TorchServe(work / "state", config, model_store, timeout=600) as engine:
        properties = serve.read_properties(config)
        client = Client(
            properties["inference_address"], model, timeout=300, key_file=engine.state_dir / "key_file.json"
        )
        return timed_run(export, work / "served.jsonl", model, ServedScorer(client), concurrency=4)


def on_ray(export: Path, work: Path, model: str, artifacts: Path) -> dict:
    """Two nodes on this machine (`ray start`), one CPU each, one actor each; the wall time of
    the command, Ray's start-up in the scoring command included."""
    with local_cluster(nodes=2, cpus_per_node=1) as address:
        started = time.perf_counter()
        run, placement = score_on_cluster(
            export, work / "ray.jsonl", model, artifacts, address, batch_size=BATCH
        )
        seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    listings = sum(1 for _ in (work / "ray.jsonl").open())
    return {
        "listings": listings,
        "seconds": round(seconds, 1),
        "listings_per_second": listings / seconds,
        "placement": placement,
    }


def table(results: dict, cores: int) -> str:
    ceiling = results["model_alone"]["listings_per_second"]
    lines = ["| way | listings | seconds | listings/s | of the model alone |", "|---|---|---|---|---|"]
    for way, figures in results["ways"].items():
        rate = figures["listings_per_second"]
        lines.append(
            f"| {way} | {figures['listings']} | {figures['seconds']} | {rate:.1f} | {rate / ceiling:.2f} |"
        )
    per_core = results["ways"]["in-process"]["listings_per_second"] / cores
    hours = 10_000_000 / per_core / 3600
    lines += [
        "",
        f"Model: {results['model']} ({results['runtime']}); {cores} cores; the model alone "
        f"{ceiling:.1f} listings/s. At the in-process rate ({per_core:.1f} listings/s a core), 10 million "
        f"listings take {hours:.0f} core-hours: {hours / 16:.1f} h on one 16-core machine, "
        f"{hours / 160:.1f} h on ten.",
    ]
    if "placement" in results["ways"].get("ray data, 2 nodes", {}):
        lines += [
            "",
            "Ray Data placement (listings scored by each node's actor): "
            + ", ".join(
                f"{node}: {count}"
                for node, count in results["ways"]["ray data, 2 nodes"]["placement"].items()
            ),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--input", type=Path, default=serve.ROOT.parent / "shared" / "data" / "marketplace")
    parser.add_argument("--artifacts-dir", type=Path, default=Path("artifacts/real"))
    parser.add_argument("--model-store", type=Path, default=Path("model_store/real"))
    parser.add_argument("--model", default="combined")
    parser.add_argument("--listings", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("reports/bulk"))
    parser.add_argument("--skip", nargs="*", default=[], choices=("served", "ray"))
    args = parser.parse_args(argv)
    model_dir = args.artifacts_dir / args.model
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        export = subset_export(args.input, args.listings, work / "export")
        results = {
            "model": args.model,
            "runtime": InProcessScorer(model_dir).service.settings.runtime_label,
            "model_alone": model_alone(export, model_dir),
            "ways": {},
        }
        print(json.dumps(results["model_alone"]), flush=True)
        results["ways"]["in-process"] = timed_run(
            export, work / "in.jsonl", args.model, InProcessScorer(model_dir), concurrency=2
        )
        print(json.dumps(results["ways"]), flush=True)
        if "served" not in args.skip:
            results["ways"]["served (TorchServe, client)"] = served(
                export, work, args.model, args.model_store
            )
            print(json.dumps(results["ways"]), flush=True)
        if "ray" not in args.skip:
            results["ways"]["ray data, 2 nodes"] = on_ray(
                export, work, args.model, args.artifacts_dir.resolve()
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bulk.json").write_text(json.dumps(results, indent=2))
    (args.out / "bulk.md").write_text(table(results, os.cpu_count() or 1))
    print((args.out / "bulk.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
