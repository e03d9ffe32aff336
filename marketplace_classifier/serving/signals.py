"""What the serving core tells an on-call engineer, as Prometheus metrics with bounded labels:
answers per category, the top probability, the review flag, how deep the answered category path
is confident, refusals per reason, and what the
listings look like (photos per listing, text length, photo size as decoded). Every series carries
the model and its version; no label ever holds request content.

Each engine's workers are processes of their own: with PROMETHEUS_MULTIPROC_DIR set
(marketplace_classifier/ops/serve.py
sets it) they write to one folder that marketplace_classifier/serving/metrics_exporter.py reads, adds up and
serves,
with the drift of the live traffic against the training reference (reference.json, export)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram

# Fixed vocabularies and buckets: the label sets stay bounded whatever requests carry.
REFUSAL_REASONS = {400: "bad_request", 404: "not_found", 413: "too_large", 415: "unsupported_media",
                   503: "busy"}
OTHER_REASON = "internal"
TOP_PROBABILITY_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)
TEXT_CHARS_BUCKETS = (0, 20, 50, 100, 200, 400, 800, 1600, 3200, 6400, 20000)
PHOTO_SIDE_BUCKETS = (64, 128, 256, 384, 512, 768, 1024, 1600, 2400, 4000, 8000)
PHOTOS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 10)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LABELS = ("model", "version")
DEPTH_LABELS = ("0", "1", "2", "3", "4+")  # confident depths: levels, never category names


class Signals:
    """The core's metrics of one served model version, in `registry` (default: the process's)."""

    _lock = threading.Lock()
    _families: dict = {}

    def __init__(self, model: str, version: str | None, registry: CollectorRegistry | None = None):
        self.labels = {"model": model, "version": version or "unversioned"}
        self.families = self._shared(registry)

    @classmethod
    def _shared(cls, registry: CollectorRegistry | None) -> dict:
        """One set of metric families per registry (a process may serve several models)."""
        from prometheus_client import REGISTRY

        registry = registry or REGISTRY
        with cls._lock:
            if id(registry) not in cls._families:
                cls._families[id(registry)] = _families(registry)
            return cls._families[id(registry)]

    def answered(self, category: str, probability: float, needs_review: bool, photos: int | None,
                 text_chars: int | None, photo_sides: list[int], confident_depth: int = 1) -> None:
        """One listing answered (`category` is one of the model's own class names;
        `confident_depth`: the levels of its path that passed their review thresholds)."""
        family = self.families
        family["answers"].labels(**self.labels, category=category).inc()
        depth = DEPTH_LABELS[min(max(int(confident_depth), 0), len(DEPTH_LABELS) - 1)]
        family["depths"].labels(**self.labels, depth=depth).inc()
        family["top_probability"].labels(**self.labels).observe(probability)
        family["reviews"].labels(**self.labels, needs_review=str(bool(needs_review)).lower()).inc()
        if photos is not None:
            family["photos"].labels(**self.labels).observe(photos)
        if text_chars is not None:
            family["text_chars"].labels(**self.labels).observe(text_chars)
        for side in photo_sides:
            family["photo_side"].labels(**self.labels).observe(side)

    def refused(self, status: int) -> None:
        reason = REFUSAL_REASONS.get(status, OTHER_REASON)
        self.families["refusals"].labels(**self.labels, reason=reason).inc()

    def batch_seconds(self, seconds: float, requests: int) -> None:
        """A batch's time in the worker, once for each of its requests."""
        histogram = self.families["latency"].labels(**self.labels)
        for _ in range(requests):
            histogram.observe(seconds)

    def started(self) -> None:
        self.families["starts"].labels(**self.labels).inc()


def _families(registry: CollectorRegistry) -> dict:
    def counter(name: str, text: str, *extra: str) -> Counter:
        return Counter(name, text, (*LABELS, *extra), registry=registry)

    def histogram(name: str, text: str, buckets: tuple) -> Histogram:
        return Histogram(name, text, LABELS, buckets=buckets, registry=registry)

    return {
        "answers": counter("marketplace_answers", "Listings answered, per category answered", "category"),
        "reviews": counter("marketplace_review_flags", "Listings answered, by their review flag",
                           "needs_review"),
        "depths": counter("marketplace_confident_depth", "Listings answered, by the levels of their "
                          "category path that passed their review thresholds (0: not even the root)",
                          "depth"),
        "refusals": counter("marketplace_refusals", "Requests refused, per reason (a fixed list)", "reason"),
        "starts": counter("marketplace_worker_starts", "Workers (or replicas) that loaded the model"),
        "top_probability": histogram("marketplace_top_probability", "The answered category's probability",
                                     TOP_PROBABILITY_BUCKETS),
        "photos": histogram("marketplace_photos_per_listing", "Photos per answered listing", PHOTOS_BUCKETS),
        "text_chars": histogram("marketplace_text_chars", "Characters of an answered listing's text",
                                TEXT_CHARS_BUCKETS),
        "photo_side": histogram("marketplace_photo_side_pixels", "Longer side of each answered photo as "
                                "decoded, in pixels", PHOTO_SIDE_BUCKETS),
        "latency": histogram("marketplace_request_seconds", "A request's batch time in the worker",
                             LATENCY_BUCKETS),
    }
