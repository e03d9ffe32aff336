"""The serving core's metrics of every worker, added up, with the drift of the live traffic.

Usage: python -m marketplace_classifier.serving.metrics_exporter --multiproc-dir .serve/metrics --model-store
model_store
       [--port 8083] [--window-seconds 300] [--min-listings 100]
Workers write their signals (marketplace_classifier/serving/signals.py) into the multiprocess folder; this
process
serves their sum on 127.0.0.1 for Prometheus, and per model version the population stability
index (PSI) of each signal over a sliding window against the training reference that the
version's archive (or exported folder) carries: categories, top probability, review flag, text
length, photos per listing, photo size.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
import zipfile
from collections import deque
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from marketplace_classifier.serving.layout import ExportLayout
from marketplace_classifier.serving.settings import REFERENCE_FILE

EPSILON = 1e-4  # a share never taken as exactly zero (PSI divides by it)
DRIFT_THRESHOLD = 0.25  # PSI above it: the traffic no longer looks like training (deploy/monitoring)
# signal -> (metric family, how its buckets are read)
HISTOGRAMS = {"top_probability": "marketplace_top_probability", "text_chars": "marketplace_text_chars",
              "photos_per_listing": "marketplace_photos_per_listing",
              "photo_side": "marketplace_photo_side_pixels"}


def psi(live: list[float], reference: list[float], reference_count: float | None = None) -> float:
    """Population stability index of live counts against reference shares over the same buckets,
    less what sampling alone gives two samples of these sizes from one distribution (about
    (buckets - 1) x (1/live + 1/reference)), so that a small window or reference does not read as
    drift. Both sides get half a count per bucket (Jeffreys), so an empty bucket in a small
    sample is not read as a zero share; a reference of unknown size is floored at EPSILON."""
    total_live, buckets = sum(live), len(live)
    if total_live <= 0:
        return 0.0
    live_shares = [(count + 0.5) / (total_live + 0.5 * buckets) for count in live]
    if reference_count:
        reference_shares = [(share * reference_count + 0.5) / (reference_count + 0.5 * buckets)
                            for share in reference]
    else:
        reference_shares = [max(share, EPSILON) for share in reference]
    index = sum((p - q) * math.log(p / q) for p, q in zip(live_shares, reference_shares, strict=True))
    noise = (buckets - 1) * (1 / total_live + (1 / reference_count if reference_count else 0))
    return max(index - noise, 0.0)


def counts_by_version(families) -> dict[tuple[str, str], dict]:
    """What drift needs from the metric families, per (model, version): category counts, review
    counts and each histogram's per-bucket counts (cumulative buckets differenced)."""
    found: dict[tuple[str, str], dict] = {}
    cumulative: dict[tuple, dict[float, float]] = {}
    for family in families:
        for sample in family.samples:
            labels = sample.labels
            key = (labels.get("model"), labels.get("version"))
            if None in key:
                continue
            mine = found.setdefault(key, {"categories": {}, "reviews": {}, "depths": {}})
            if sample.name == "marketplace_answers_total":
                category = labels["category"]
                mine["categories"][category] = mine["categories"].get(category, 0) + sample.value
            elif sample.name == "marketplace_review_flags_total":
                flag = labels["needs_review"]
                mine["reviews"][flag] = mine["reviews"].get(flag, 0) + sample.value
            elif sample.name == "marketplace_confident_depth_total":
                depth = labels["depth"]
                mine["depths"][depth] = mine["depths"].get(depth, 0) + sample.value
            else:
                for signal, name in HISTOGRAMS.items():
                    if sample.name == f"{name}_bucket":
                        bound = float(labels["le"])
                        buckets = cumulative.setdefault((key, signal), {})
                        buckets[bound] = buckets.get(bound, 0) + sample.value
    for (key, signal), buckets in cumulative.items():
        bounds = sorted(buckets)
        per_bucket = [buckets[bound] - (buckets[bounds[i - 1]] if i else 0) for i, bound in enumerate(bounds)]
        found[key][signal] = per_bucket
    return found


def window_counts(now: dict, then: dict) -> dict:
    """Counts in a window: the latest snapshot minus the one at the window's start."""
    window = {}
    for signal, value in now.items():
        before = then.get(signal)
        if isinstance(value, dict):
            window[signal] = {k: v - (before or {}).get(k, 0) for k, v in value.items()}
        else:
            window[signal] = [v - b for v, b in zip(value, before, strict=True)] if before else list(value)
    return window


def drift_of(window: dict, reference: dict) -> dict[str, float]:
    """PSI of each signal that both the window and the reference have."""
    drift = {}
    names = reference.get("categories", {}).get("names", [])
    if names and window.get("categories"):
        live = [window["categories"].get(name, 0) for name in names]
        categories = reference["categories"]
        drift["categories"] = psi(live, categories["shares"], categories.get("count"))
    if "review_share" in reference and window.get("reviews"):
        flagged, total = window["reviews"].get("true", 0), sum(window["reviews"].values())
        share = reference["review_share"]["validation"]
        drift["review_share"] = psi([flagged, total - flagged], [share, 1 - share],
                                    reference["review_share"].get("listings"))
    if "confident_depth" in reference and sum(window.get("depths", {}).values()) > 0:
        depths = reference["confident_depth"]
        live = [0.0] * len(depths["shares"])
        for label, count in window["depths"].items():  # "4+" and deeper count at the last depth
            live[min(int(label.rstrip("+")), len(live) - 1)] += count
        drift["confident_depth"] = psi(live, depths["shares"], depths.get("listings"))
    for signal in HISTOGRAMS:
        if signal in reference and signal in window and sum(window[signal]) > 0:
            drift[signal] = psi(window[signal], reference[signal]["shares"], reference[signal].get("count"))
    return drift


class DriftCollector:
    """Prometheus collector of drift gauges, from snapshots of `source()` (metric families) kept
    over `window_seconds`."""

    def __init__(self, source, references: dict[tuple[str, str], dict], window_seconds: float = 300,
                 min_listings: int = 100, clock=time.monotonic):
        self.source, self.references = source, references
        self.window_seconds, self.min_listings, self.clock = window_seconds, min_listings, clock
        self.snapshots: deque = deque()
        self.lock = threading.Lock()
        self.snapshot()  # the baseline: what was counted before the exporter started is not the window's

    def snapshot(self) -> None:
        """Record the current counts (a background thread calls this between scrapes)."""
        counts = counts_by_version(self.source())
        now = self.clock()
        with self.lock:
            self.snapshots.append((now, counts))
            while len(self.snapshots) > 1 and self.snapshots[1][0] <= now - self.window_seconds:
                self.snapshots.popleft()

    def drift(self) -> dict[tuple[str, str], dict]:
        """Per version: the listings in the window and the PSI of each signal (none below
        min_listings: too few to tell)."""
        self.snapshot()
        with self.lock:
            (_, then), (_, now) = self.snapshots[0], self.snapshots[-1]
        result = {}
        for key, counts in now.items():
            window = window_counts(counts, then.get(key, {}))
            listings = sum(window.get("reviews", {}).values())
            reference = self.references.get(key) or self.references.get((key[0], "*"))
            scores = drift_of(window, reference) if reference and listings >= self.min_listings else {}
            review = (reference or {}).get("review_share", {}).get("validation")
            result[key] = {"listings": listings, "psi": scores, "reference_review_share": review}
        return result

    def collect(self):
        version = ["model", "version"]
        psi_family = GaugeMetricFamily("marketplace_drift_psi", "Population stability index of a signal "
                                       "over the window against the training reference",
                                       labels=[*version, "signal"])
        listings = GaugeMetricFamily("marketplace_drift_window_listings",
                                     "Listings answered in the drift window", labels=version)
        review = GaugeMetricFamily("marketplace_reference_review_share",
                                   "Share of validation listings flagged for review", labels=version)
        for (model, version), found in self.drift().items():
            listings.add_metric([model, version], found["listings"])
            if found["reference_review_share"] is not None:
                review.add_metric([model, version], found["reference_review_share"])
            for signal, value in found["psi"].items():
                psi_family.add_metric([model, version, signal], value)
        yield from (psi_family, listings, review)


def references_in(store: Path | None, artifacts: Path | None) -> dict[tuple[str, str], dict]:
    """(model, version) -> reference, from the archives of a model store (their manifest's version)
    and from exported folders (their model card's version, or any version of that model)."""
    found = {}
    for archive in sorted(store.glob("*.mar")) if store else []:
        with zipfile.ZipFile(archive) as opened:
            if REFERENCE_FILE not in opened.namelist():
                continue
            model = json.loads(opened.read("MAR-INF/MANIFEST.json"))["model"]
            found[(model["modelName"], model["modelVersion"])] = json.loads(opened.read(REFERENCE_FILE))
    for folder in sorted(artifacts.iterdir()) if artifacts else []:
        if (folder / REFERENCE_FILE).exists():
            card = ExportLayout(folder).card
            version = json.loads(card.read_text())["version"] if card.exists() else "*"
            found[(folder.name, version)] = json.loads((folder / REFERENCE_FILE).read_text())
    return found


def serve_forever(multiproc_dir: Path, references: dict, port: int, window_seconds: float, min_listings: int,
                  host: str = "127.0.0.1", tick_seconds: float = 5.0) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    workers = CollectorRegistry()
    MultiProcessCollector(workers, path=str(multiproc_dir))
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(multiproc_dir))
    drift = DriftCollector(workers.collect, references, window_seconds, min_listings)
    registry.register(drift)
    start_http_server(port, addr=host, registry=registry)
    while True:  # snapshots between scrapes keep the window's start
        drift.snapshot()
        time.sleep(tick_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--multiproc-dir", type=Path, required=True)
    parser.add_argument("--model-store", type=Path, help="archives whose reference.json to compare with")
    parser.add_argument("--artifacts-dir", type=Path, help="exported folders (the second engine)")
    parser.add_argument("--port", type=int, default=8083)
    parser.add_argument("--window-seconds", type=float, default=300)
    parser.add_argument("--min-listings", type=int, default=100)
    parser.add_argument("--tick-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    references = references_in(args.model_store, args.artifacts_dir)
    serve_forever(args.multiproc_dir, references, args.port, args.window_seconds, args.min_listings,
                  tick_seconds=args.tick_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
