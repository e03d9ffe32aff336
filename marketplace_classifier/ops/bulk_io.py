"""Bulk scoring's files: the listings it reads (a marketplace export folder, a CSV or a JSONL),
the journal it appends answers to (what makes a run resumable), and the output it finishes with
(JSONL, CSV or Parquet)."""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from marketplace_classifier.client import Classification, ClassifierError, Listing
from marketplace_classifier.serving.files import atomic_write

FORMATS = (".jsonl", ".csv", ".parquet")
COLUMNS = (
    "row",
    "id",
    "model",
    "model_version",
    "category",
    "probability",
    "needs_review",
    "path",
    "path_probabilities",
    "confident_depth",
    "confident_path",
    "truth",
    "error",
    "status",
)
PATH_SEPARATOR = " / "


class BulkError(ValueError):
    """A bulk run that cannot start: the message says what is wrong."""


@dataclass(frozen=True)
class InputRow:
    """One listing of the input, as read (photos are paths, read when its batch is scored), or
    the reason it cannot be scored."""

    row: int
    id: str
    text: str | None = None
    product_name: str | None = None
    product_description: str | None = None
    photos: tuple[Path, ...] = ()
    truth: str | None = None
    problem: str | None = None

    def listing(self, max_photos: int) -> Listing:
        """The listing to send, or BulkError saying why this row cannot be one."""
        if self.problem:
            raise BulkError(self.problem)
        if len(self.photos) > max_photos:
            raise BulkError(f"{len(self.photos)} photos; at most {max_photos} are sent")
        images = []
        for photo in self.photos:
            try:
                images.append(photo.read_bytes())
            except OSError as error:
                raise BulkError(f"photo {photo.name}: {error.strerror or type(error).__name__}") from error
        try:
            return Listing(self.text, self.product_name, self.product_description, tuple(images))
        except ValueError as error:
            raise BulkError(str(error)) from error


# ---------------------------------------------------------------- reading listings
def read_rows(source: Path) -> Iterator[InputRow]:
    """The listings of `source`: an export folder (Products.csv, Images.csv, images/), a .csv
    (id, text or product_name/product_description, photos separated by `;`, relative to the
    file) or a .jsonl (one object a line, the same fields, photos a list)."""
    source = Path(source)
    if source.is_dir():
        if not (source / "Products.csv").is_file():
            raise BulkError(f"{source} is a folder without Products.csv (a marketplace export has one)")
        return export_rows(source)
    if not source.is_file():
        raise BulkError(f"no input at {source}")
    if source.suffix == ".csv":
        return csv_rows(source)
    if source.suffix == ".jsonl":
        return jsonl_rows(source)
    raise BulkError(f"cannot read {source.name}: give an export folder, a .csv or a .jsonl")


def export_rows(folder: Path) -> Iterator[InputRow]:
    photos: dict[str, list[Path]] = {}
    images_csv = folder / "Images.csv"
    if images_csv.is_file():
        for record in csv_records(images_csv):
            if record.get("product_id") and record.get("id"):
                photos.setdefault(record["product_id"], []).append(folder / "images" / f"{record['id']}.jpg")
    for row, record in enumerate(csv_records(folder / "Products.csv")):
        yield InputRow(
            row,
            record.get("id") or str(row),
            None,
            record.get("product_name"),
            record.get("product_description"),
            tuple(photos.get(record.get("id", ""), ())),
            record.get("category") or None,
        )


def csv_rows(path: Path) -> Iterator[InputRow]:
    for row, record in enumerate(csv_records(path)):
        photos = [part.strip() for part in (record.get("photos") or "").split(";") if part.strip()]
        yield InputRow(
            row,
            record.get("id") or str(row),
            record.get("text") or None,
            record.get("product_name") or None,
            record.get("product_description") or None,
            tuple(path.parent / photo for photo in photos),
            record.get("category") or None,
        )


def jsonl_rows(path: Path) -> Iterator[InputRow]:
    with path.open(encoding="utf-8", errors="replace") as stream:
        for row, line in enumerate(stream):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
                photos = record.get("photos") or []
                if not isinstance(photos, list) or not all(isinstance(photo, str) for photo in photos):
                    raise ValueError("'photos' is not a list of paths")
                yield InputRow(
                    row,
                    str(record.get("id", row)),
                    text_field(record, "text"),
                    text_field(record, "product_name"),
                    text_field(record, "product_description"),
                    tuple(path.parent / photo for photo in photos),
                    text_field(record, "category"),
                )
            except ValueError as error:
                yield InputRow(row, str(row), problem=f"line {row + 1} is not a listing: {error}")


def text_field(record: dict, name: str) -> str | None:
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"'{name}' is not text")
    return value or None


def csv_records(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a CSV as dicts; the export's unnamed index column is dropped. Records end at "\n"
    only: the export's descriptions hold bare "\r"s, which the csv module would take for ends of
    lines, so they become spaces first."""
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", errors="replace", newline="\n") as stream:
        lines = (line.replace("\r\n", "\n").replace("\r", " ") for line in stream)
        for record in csv.DictReader(lines):
            yield {key: value for key, value in record.items() if key}


# ---------------------------------------------------------------- answers as rows
def output_row(row: InputRow, model: str, answer: Classification | ClassifierError | BulkError) -> dict:
    """One output row: the answer's path and figures, or the reason the listing has none."""
    record = dict.fromkeys(COLUMNS) | {"row": row.row, "id": row.id, "model": model, "truth": row.truth}
    if isinstance(answer, Classification):
        return record | {
            "model_version": answer.model_version,
            "category": answer.category,
            "probability": answer.probability,
            "needs_review": answer.needs_review,
            "path": PATH_SEPARATOR.join(answer.path_names),
            "path_probabilities": [level.probability for level in answer.path],
            "confident_depth": answer.confident_depth,
            "confident_path": PATH_SEPARATOR.join(answer.confident_path),
        }
    return record | {
        "error": str(getattr(answer, "message", answer)),
        "status": getattr(answer, "status", 0) or None,
    }


# ---------------------------------------------------------------- the journal and the output
@dataclass
class Journal:
    """Answers appended as JSON lines, flushed and synced after each batch: after Ctrl-C or
    kill -9 the rows it holds are whole (a torn last line is cut off) and are not scored again."""

    path: Path
    done: set[int] = field(default_factory=set)

    def open(self) -> set[int]:
        """The rows already answered; a torn last line (a write cut by kill -9) is removed."""
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self.done
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            with self.path.open("r+b") as stream:
                stream.truncate(len(whole))
        self.done = {json.loads(line)["row"] for line in whole.splitlines() if line.strip()}
        return self.done

    def append(self, records: list[dict]) -> None:
        fresh = [record for record in records if record["row"] not in self.done]
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in fresh))
            stream.flush()
            os.fsync(stream.fileno())
        self.done.update(record["row"] for record in fresh)

    def records(self) -> list[dict]:
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        return sorted((json.loads(line) for line in lines if line.strip()), key=lambda record: record["row"])


def journal_for(out: Path) -> Path:
    """A JSONL output is its own journal; a CSV or Parquet is written from one when the run ends."""
    return out if out.suffix == ".jsonl" else out.with_name(out.name + ".partial.jsonl")


def check_output(out: Path) -> None:
    if out.suffix not in FORMATS:
        raise BulkError(f"cannot write {out.name}: the output ends in {', '.join(FORMATS)}")
    if out.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as error:
            raise BulkError(
                "writing Parquet needs pyarrow: pip install 'marketplace-classifier[bulk]'"
            ) from error
    if out.suffix != ".jsonl" and out.exists() and not journal_for(out).exists():
        raise BulkError(f"{out} is already written; remove it to score again")


def finish(out: Path, journal: Journal) -> None:
    """Write the CSV or Parquet output from the journal (sorted by row), then drop the journal."""
    if out.suffix == ".jsonl":
        return
    records = journal.records()
    if out.suffix == ".csv":
        atomic_write(out, lambda temporary: write_csv(temporary, records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(records)
        atomic_write(out, lambda temporary: pq.write_table(table, temporary))
    journal.path.unlink()


def write_csv(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow(record | {"path_probabilities": json.dumps(record["path_probabilities"])})
