"""Score a whole catalogue: one answer per listing of an export folder, a CSV or a JSONL, written
to JSONL, CSV or Parquet, three ways with the same answers: in-process on an exported folder and
its chosen runtime (no server), through a running server with the Python client, or on Ray Data
(ops/bulk_ray.py). Interrupted runs resume: the same command again scores only what is missing.
The command is ops/score.py."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from tqdm import tqdm

from marketplace_classifier.client import Classification, ClassifierError, Client, Listing
from marketplace_classifier.client.errors import error_for
from marketplace_classifier.ops.bulk_io import (
    BulkError,
    InputRow,
    Journal,
    check_output,
    finish,
    journal_for,
    output_row,
    read_rows,
)
from marketplace_classifier.serving.payloads import DEFAULT_MAX_PHOTOS

Answer = Classification | ClassifierError


class InProcessScorer:
    """The serving core on an exported folder, in this process: each listing a request of one
    batch, exactly as an engine hands them to it. Batches may be scored from several threads:
    their photos are decoded side by side and the model runs one batch at a time."""

    def __init__(self, model_dir: Path, threads: int = 0):
        from marketplace_classifier.serving.core import ListingService, ServingOptions

        self.service = ListingService(exported_folder(model_dir), ServingOptions(threads=threads))
        self.model_version = self.service.model_version
        self.model_lock = threading.Lock()

    def score(self, listings: list[Listing]) -> list[Answer]:
        """One answer per listing; the listings a batch's work budget left out (503) are scored
        again on their own, so that only a listing over a request's budget is refused."""
        answers = self.score_batch(listings)
        if len(listings) > 1:
            for index, answer in enumerate(answers):
                if isinstance(answer, ClassifierError) and answer.status == HTTPStatus.SERVICE_UNAVAILABLE:
                    answers[index] = self.score_batch([listings[index]])[0]
        return answers

    def score_batch(self, listings: list[Listing]) -> list[Answer]:
        from marketplace_classifier.serving.core import Request

        batch = self.service.prepare(
            [Request(listing_parts(listing), "multipart/form-data") for listing in listings]
        )
        with self.model_lock:
            self.service.predict(batch)
        return [
            Classification.from_json(answer.body)
            if answer.status == HTTPStatus.OK
            else error_for(answer.status, answer.body)
            for answer in self.service.answer(batch)
        ]


def exported_folder(model_dir: Path) -> Path:
    """`model_dir` if an export wrote it, else BulkError saying so."""
    if not (Path(model_dir) / "preprocessing.json").is_file():
        raise BulkError(f"no exported model in {model_dir} (run `marketplace-classifier export`)")
    return Path(model_dir)


def listing_parts(listing: Listing) -> dict:
    """A listing as the named parts of a multipart request: image, image_1, ... and its text."""
    parts: dict = {
        name: (str(value).lower() if isinstance(value, bool) else str(value)).encode("utf-8")
        for name, value in listing.to_json().items()
        if name != "images"
    }
    parts |= {
        ("image" if index == 0 else f"image_{index}"): photo for index, photo in enumerate(listing.images)
    }
    return parts


class ServedScorer:
    """The listings through a running server with the Python client; a request refused for its
    content is resent listing by listing so that only the bad listing carries the error."""

    def __init__(self, client: Client):
        self.client = client

    def score(self, listings: list[Listing]) -> list[Answer]:
        return self.client.classify_chunk(listings, errors="return")


@dataclass
class BulkRun:
    """One run: the input's rows not yet in the journal, loaded and scored a batch at a time
    (`concurrency` batches at once), every row's answer or reason appended to the journal."""

    source: Path
    out: Path
    model: str
    scorer: object
    batch_size: int = 16
    concurrency: int = 1
    progress: bool | None = None  # None: a bar when stderr is a terminal
    limit: int | None = None  # only the first `limit` listings of the input

    def rows(self) -> Iterator[InputRow]:
        return itertools.islice(read_rows(self.source), self.limit)

    def run(self) -> dict:
        check_output(self.out)
        journal = Journal(journal_for(self.out))
        done = journal.open()
        total = sum(1 for _ in self.rows())
        counts = {"listings": total, "resumed_from": len(done), "answered": 0, "errors": 0}
        with tqdm(
            total=total,
            initial=len(done),
            unit="listing",
            desc=f"scoring with {self.model}",
            disable=None if self.progress is None else not self.progress,
        ) as bar:
            for records in self.scored(self.pending(done)):
                append_and_count(journal, counts, records)
                bar.update(len(records))
        finish(self.out, journal)
        return counts

    def pending(self, done: set[int]) -> Iterator[list[InputRow]]:
        batch: list[InputRow] = []
        for row in self.rows():
            if row.row in done:
                continue
            batch.append(row)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def scored(self, batches: Iterator[list[InputRow]]) -> Iterator[list[dict]]:
        """Each batch's output rows, in input order, at most 2 × concurrency batches in flight."""
        with ThreadPoolExecutor(max(1, self.concurrency)) as pool:
            flight: deque[Future] = deque()
            for batch in batches:
                flight.append(pool.submit(self.score_batch, batch))
                if len(flight) >= 2 * max(1, self.concurrency):
                    yield flight.popleft().result()
            while flight:
                yield flight.popleft().result()

    def score_batch(self, rows: list[InputRow]) -> list[dict]:
        return score_rows(rows, self.scorer, self.model)


def score_rows(rows: list[InputRow], scorer, model: str) -> list[dict]:
    """The output rows of `rows`: each listing read (photos and all) and scored together, or the
    reason it cannot be."""
    answers: dict[int, Answer | BulkError] = {}
    listings: dict[int, Listing] = {}
    for row in rows:
        try:
            listings[row.row] = row.listing(DEFAULT_MAX_PHOTOS)
        except BulkError as error:
            answers[row.row] = error
    if listings:
        answers |= dict(zip(listings, scorer.score(list(listings.values())), strict=True))
    return [output_row(row, model, answers[row.row]) for row in rows]


def append_and_count(journal: Journal, counts: dict, records: list[dict]) -> None:
    """Answered rows into the journal, and into the run's answered and error counts."""
    journal.append(records)
    errors = sum(record["error"] is not None for record in records)
    counts["answered"] += len(records) - errors
    counts["errors"] += errors
