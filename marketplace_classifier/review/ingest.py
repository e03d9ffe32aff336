"""Flagged listings into the review queue, from bulk scoring's output (with the listings it
scored) or from the opt-in request log. Each flagged listing is answered again in-process by the
exported model with `explain` on, so the queue holds the model's path, probabilities and
explanation from one model version; a listing whose score came from another version is
reported, not mixed in. Ingesting the same output twice adds nothing."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

from marketplace_classifier.client.types import Listing
from marketplace_classifier.ops.bulk import InProcessScorer
from marketplace_classifier.ops.bulk_io import BulkError, read_rows
from marketplace_classifier.review.queue import NewListing, ReviewQueue
from marketplace_classifier.serving.payloads import DEFAULT_MAX_PHOTOS
from marketplace_classifier.serving.settings import ModelSettings
from marketplace_classifier.serving.taxonomy import SEPARATOR, Taxonomy

TRUE = ("true", "1", "yes")


class IngestError(ValueError):
    """Input the queue cannot take: what and where."""


def score_records(path: Path) -> Iterator[dict]:
    """The rows of a bulk-scoring output: CSV, JSON lines or Parquet."""
    if not path.is_file():
        raise IngestError(f"no scores at {path}")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as stream:
            yield from csv.DictReader(stream)
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as stream:
            for number, line in enumerate(stream, 1):
                try:
                    yield json.loads(line)
                except ValueError as error:
                    raise IngestError(f"{path}:{number}: not JSON") from error
    elif path.suffix == ".parquet":
        import pyarrow.parquet

        yield from pyarrow.parquet.read_table(path).to_pylist()
    else:
        raise IngestError(f"cannot read {path.name}: give bulk scoring's .csv, .jsonl or .parquet")


def flagged(record: dict, below_depth: int = 0) -> bool:
    """Flagged for review (`needs_review`), or, with `below_depth`, confident to fewer levels
    of its path than that (a marketplace files under the leaf)."""
    if record.get("error"):
        return False
    if str(record.get("needs_review", "")).strip().lower() in TRUE:
        return True
    depth = record.get("confident_depth")
    return bool(below_depth) and depth not in (None, "") and int(depth) < below_depth


def taxonomy_paths(model_dir: Path) -> list[str]:
    """Every node of the model's category tree as a path a reviewer may pick."""
    settings = ModelSettings.load(model_dir)
    names = json.loads((model_dir / "index_to_name.json").read_text())
    taxonomy = Taxonomy.from_json([names[str(i)] for i in range(len(names))], settings.taxonomy)
    nodes = {(root,) for root in taxonomy.roots}
    for terminal in taxonomy.terminals:
        nodes |= {tuple(terminal[:depth]) for depth in range(1, len(terminal) + 1)}
    return sorted(SEPARATOR.join(node) for node in nodes)


class Ingester:
    """One model's in-process answers, with explanations, for the listings to enqueue."""

    def __init__(self, queue: ReviewQueue, model_dir: Path, source: str):
        self.queue, self.source = queue, source
        self.scorer = InProcessScorer(model_dir)
        self.model = self.scorer.service.model_name
        queue.add_paths(taxonomy_paths(model_dir))

    def enqueue(self, source_id: str, listing: Listing) -> bool:
        """Answer the listing with its explanation and enqueue it; False if queued already."""
        answer = self.scorer.score([dataclasses.replace(listing, explain=True)])[0]
        if not hasattr(answer, "path"):
            raise IngestError(f"listing {source_id}: {answer}")
        new = NewListing(self.source, source_id, self.model, dataclasses.asdict(answer), listing.text,
                         listing.product_name, listing.product_description, listing.images)
        return self.queue.add(new) is not None

    def from_scores(self, scores: Path, listings: Path, below_depth: int = 0) -> dict[str, int]:
        """The flagged rows of `scores` (see `flagged`), their listings read from `listings`
        (what was scored)."""
        wanted, counts = {}, {"flagged": 0, "added": 0, "queued_already": 0, "other_version": 0, "missing": 0}
        version = self.scorer.model_version
        for record in score_records(scores):
            if flagged(record, below_depth):
                counts["flagged"] += 1
                if version and record.get("model_version") and record["model_version"] != version:
                    counts["other_version"] += 1
                else:
                    wanted[str(record["id"])] = record
        try:
            rows = {row.id: row for row in read_rows(listings) if row.id in wanted}
        except BulkError as error:
            raise IngestError(str(error)) from error
        for source_id in wanted:
            row = rows.get(source_id)
            if row is None:
                counts["missing"] += 1
                continue
            try:
                listing = row.listing(DEFAULT_MAX_PHOTOS)
            except BulkError:
                counts["missing"] += 1
                continue
            counts["added" if self.enqueue(source_id, listing) else "queued_already"] += 1
        return counts

    def from_request_log(self, folder: Path) -> dict[str, int]:
        """The flagged lines of a request log (text only: the log keeps photos' digests, not
        photos, so only a text model's answers can be explained again)."""
        counts = {"flagged": 0, "added": 0, "queued_already": 0, "without_photos": 0}
        for path in sorted(Path(folder).glob("requests-*.jsonl")):
            with path.open(encoding="utf-8") as stream:
                for number, line in enumerate(stream, 1):
                    self.enqueue_logged(f"{path.name}:{number}", json.loads(line), counts)
        return counts

    def enqueue_logged(self, source_id: str, record: dict, counts: dict[str, int]) -> None:
        """One request-log line, counted; enqueued when it was flagged and can be shown whole."""
        if not record.get("answer", {}).get("needs_review"):
            return
        counts["flagged"] += 1
        if record.get("photos") and self.scorer.service.kind.uses_image:
            counts["without_photos"] += 1
            return
        added = self.enqueue(source_id, Listing(text=record.get("text") or ""))
        counts["added" if added else "queued_already"] += 1
