"""Cleaning of a raw marketplace export: tables, photos, a report of everything dropped."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from marketplace_classifier.serving.files import atomic_write
from marketplace_classifier.serving.processing import (
    InputError,
    decode_image,
    fit_to_square,
    strip_description_boilerplate,
    strip_name_boilerplate,
)
from marketplace_classifier.serving.settings import LABELS_FILE, write_index_to_name
from marketplace_classifier.training.categories import ROOT_CATEGORIES, build_index_to_name, root_category

PRODUCT_COLUMNS = ["id", "product_name", "category", "product_description", "price", "location"]
PHOTO_SIZES = "photo_sizes.csv"  # width and height of each kept photo as sent
IMAGE_COLUMNS = ["id", "product_id", "bucket_link", "image_ref", "create_time"]
MANIFEST = "images_manifest.json"
MANIFEST_EVERY = 100  # photos between saves of the manifest of finished work


@dataclass
class CleaningReport:
    """Every row or photo dropped, with its reason, plus the counts in and out."""

    products_in: int = 0
    products_out: int = 0
    images_in: int = 0
    images_out: int = 0
    images_reused: int = 0
    dropped_products: list[dict] = field(default_factory=list)
    dropped_images: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def reasons(self, dropped: list[dict]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in dropped:
            counts[item["reason"]] = counts.get(item["reason"], 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {
            "products_in": self.products_in, "products_out": self.products_out,
            "images_in": self.images_in, "images_out": self.images_out,
            "images_reused": self.images_reused, "seconds": round(self.seconds, 2),
            "dropped_product_reasons": self.reasons(self.dropped_products),
            "dropped_image_reasons": self.reasons(self.dropped_images),
            "notes": self.notes,
            "dropped_products": self.dropped_products,
            "dropped_images": self.dropped_images,
        }

    def summary(self) -> str:
        lines = [f"products: {self.products_in} in, {self.products_out} out",
                 f"images:   {self.images_in} in, {self.images_out} out "
                 f"({self.images_reused} already clean, reused)"]
        for reason, count in self.reasons(self.dropped_products).items():
            lines.append(f"  dropped product x{count}: {reason}")
        for reason, count in self.reasons(self.dropped_images).items():
            lines.append(f"  dropped image   x{count}: {reason}")
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"took {self.seconds:.1f}s")
        return "\n".join(lines)


# ---------------------------------------------------------------- reading raw files
def read_export_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    r"""Read a CSV of the export as published.

    Only `\n` ends a record (descriptions hold bare `\r` inside unquoted fields);
    files whose lines end in `\r\n` lose that `\r` from the last column.
    """
    frame = pd.read_csv(path, lineterminator="\n", index_col=0, dtype=str, keep_default_na=False)
    last = frame.columns[-1]
    if last.endswith("\r"):
        frame = frame.rename(columns={last: last[:-1]})
        frame[last[:-1]] = frame[last[:-1]].str.removesuffix("\r")
    _require_columns(frame, columns, path)
    return frame[columns]


def read_raw_products(path: Path) -> pd.DataFrame:
    return read_export_csv(path, PRODUCT_COLUMNS)


def read_raw_images(path: Path) -> pd.DataFrame:
    return read_export_csv(path, IMAGE_COLUMNS)


def _require_columns(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; found {list(frame.columns)}")


# ---------------------------------------------------------------- tables
def parse_price(text: str) -> float:
    """`£1,200.00` / `Â£5.00` -> 1200.0 / 5.0; NaN when there is no number."""
    cleaned = str(text).replace("Â", "").replace("£", "").replace(",", "").strip()
    try:
        return float(cleaned)
    except ValueError:
        return float("nan")


def clean_products(raw: pd.DataFrame, report: CleaningReport) -> pd.DataFrame:
    """Typed, boilerplate-free products; duplicates and unusable rows dropped and reported."""
    report.products_in = len(raw)
    frame = raw.copy()
    frame["product_description"] = frame["product_description"].str.replace("\r", " ")
    duplicated = frame.duplicated(keep="first")
    _drop(frame, duplicated, "exact duplicate of an earlier product row", report.dropped_products)
    frame = frame[~duplicated]
    repeated_id = frame["id"].duplicated(keep="first")
    _drop(frame, repeated_id, "product id repeated with different content",
          report.dropped_products)
    frame = frame[~repeated_id]
    frame["root_category"] = frame["category"].map(root_category)
    unknown = ~frame["root_category"].isin(ROOT_CATEGORIES)
    _drop(frame, unknown, "root category is not one of the 13 known ones", report.dropped_products)
    frame = frame[~unknown]
    missing_description = int((frame["product_description"].str.strip() == "").sum())
    if missing_description:
        report.notes.append(f"{missing_description} products have no description "
                            "(kept: the name still describes them)")
    names = frame["product_name"].map(strip_name_boilerplate)
    descriptions = frame["product_description"].map(strip_description_boilerplate)
    report.notes.append(
        f"site boilerplate removed from {int((names != frame['product_name']).sum())} names and "
        f"{int(frame['product_description'].str.contains('Posted by', case=False).sum())} descriptions "
        "(it names the category)")
    frame["product_name"], frame["product_description"] = names, descriptions
    empty = (frame["product_name"] == "") & (frame["product_description"] == "")
    _drop(frame, empty, "no name and no description left", report.dropped_products)
    frame = frame[~empty]
    frame["price"] = frame["price"].map(parse_price).astype("float64")
    unpriced = int(frame["price"].isna().sum())
    if unpriced:
        report.notes.append(f"{unpriced} products have no readable price (kept, price NaN)")
    report.products_out = len(frame)
    return typed_products(frame.reset_index(drop=True))


def typed_products(frame: pd.DataFrame) -> pd.DataFrame:
    """Dtypes of a clean products table: root category as `category`, the rest converted."""
    frame = frame.copy()
    frame["product_description"] = frame["product_description"].fillna("")
    frame = frame.convert_dtypes()
    frame["price"] = frame["price"].astype("float64")
    frame["root_category"] = pd.Categorical(frame["root_category"], categories=sorted(ROOT_CATEGORIES))
    return frame


def _drop(frame: pd.DataFrame, mask: pd.Series, reason: str, sink: list[dict]) -> None:
    for _, row in frame[mask].iterrows():
        sink.append({"id": row["id"], "reason": reason})


# ---------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageJob:
    image_id: str
    source: str
    target: str
    size: int


def clean_one_image(job: ImageJob) -> str | None:
    """Write the cleaned square RGB photo; return None, or the reason it was dropped."""
    try:
        picture = decode_image(Path(job.source).read_bytes())
    except FileNotFoundError:
        return "image file missing"
    except InputError as error:
        return str(error)
    square = fit_to_square(picture, job.size)
    atomic_write(job.target, lambda temporary: square.save(temporary, "JPEG", quality=95))
    return None


def clean_images(images: pd.DataFrame, products: pd.DataFrame, data_dir: Path, out: Path,
                 size: int, workers: int, report: CleaningReport) -> pd.DataFrame:
    """Clean every photo of a kept product, in parallel, skipping unchanged clean ones."""
    report.images_in = len(images)
    images_out = out / "images"
    images_out.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(out / MANIFEST)
    duplicated = images["id"].duplicated(keep="first")
    _drop(images, duplicated, "image id repeated", report.dropped_images)
    images = images[~duplicated]
    orphan = ~images["product_id"].isin(products["id"])
    _drop(images, orphan, "its product was dropped or does not exist", report.dropped_images)
    images = images[~orphan]

    jobs, reused = [], set()
    for image_id in images["id"]:
        source = data_dir / "images" / f"{image_id}.jpg"
        target = images_out / f"{image_id}.jpg"
        stamp = _source_stamp(source, size)
        if stamp is not None and manifest.get(image_id) == stamp and target.exists():
            reused.add(image_id)
        else:
            manifest.pop(image_id, None)
            jobs.append(ImageJob(image_id, str(source), str(target), size))
    failures: dict[str, str] = {}

    def record(job: ImageJob, reason: str | None) -> None:
        if reason is None:
            manifest[job.image_id] = _source_stamp(Path(job.source), size)
        else:
            failures[job.image_id] = reason
        if (len(manifest) + len(failures)) % MANIFEST_EVERY == 0:
            _write_manifest(out / MANIFEST, manifest)

    try:
        _run_jobs(jobs, workers, record)
    finally:  # what finished is kept, even when interrupted, so a rerun does not redo it
        _write_manifest(out / MANIFEST, manifest)
    for job in jobs:
        if job.image_id in failures:
            report.dropped_images.append({"id": job.image_id, "reason": failures[job.image_id]})
    kept = images[~images["id"].isin(failures)].reset_index(drop=True)
    report.images_out, report.images_reused = len(kept), len(reused)
    return kept


def _run_jobs(jobs: list[ImageJob], workers: int, record) -> None:
    """Clean the photos of `jobs`, calling `record(job, reason or None)` as each finishes."""
    if not jobs:
        return
    with tqdm(total=len(jobs), desc="cleaning images", unit="img", disable=None) as progress:
        if workers <= 1:
            results = map(clean_one_image, jobs)
            for job, reason in zip(jobs, results, strict=True):
                record(job, reason)
                progress.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                results = pool.map(clean_one_image, jobs, chunksize=16)
                for job, reason in zip(jobs, results, strict=True):
                    record(job, reason)
                    progress.update()


def _source_stamp(source: Path, size: int) -> list | None:
    try:
        stat = source.stat()
    except FileNotFoundError:
        return None
    return [stat.st_size, stat.st_mtime_ns, size]


def _read_manifest(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_manifest(path: Path, manifest: dict) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(json.dumps(manifest)))


def check_clean_images(out: Path, size: int) -> list[str]:
    """Problems with the cleaned photos: wrong size, not 3 channels, listed but missing."""
    problems = []
    images = pd.read_csv(out / "images.csv", dtype=str)
    for image_id in images["id"]:
        path = out / "images" / f"{image_id}.jpg"
        if not path.exists():
            problems.append(f"{image_id}: missing")
            continue
        with Image.open(path) as picture:
            if picture.size != (size, size) or picture.mode != "RGB":
                problems.append(f"{image_id}: {picture.size} {picture.mode}")
    return problems


# ---------------------------------------------------------------- whole job
def clean(data_dir: Path, out: Path, size: int = 512, workers: int | None = None) -> CleaningReport:
    """Clean `data_dir` into `out` (never writing to `data_dir`) and report what was dropped."""
    data_dir, out = Path(data_dir).resolve(), Path(out).resolve()
    if out == data_dir or data_dir in out.parents:
        raise ValueError(f"output folder {out} must be outside the input folder {data_dir}")
    for name in ("Products.csv", "Images.csv", "images"):
        if not (data_dir / name).exists():
            raise FileNotFoundError(f"{data_dir} has no {name}: is it a marketplace export?")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    report = CleaningReport()
    products = clean_products(read_raw_products(data_dir / "Products.csv"), report)
    images = clean_images(read_raw_images(data_dir / "Images.csv"), products, data_dir, out,
                          size, workers or os.cpu_count() or 1, report)
    products.to_csv(out / "products.csv", index=False)
    images.to_csv(out / "images.csv", index=False)
    photo_sizes(images, data_dir).to_csv(out / PHOTO_SIZES, index=False)
    write_index_to_name(build_index_to_name(ROOT_CATEGORIES), out / LABELS_FILE)
    (out / "cleaning.json").write_text(json.dumps({"image_size": size}) + "\n")
    report.seconds = time.perf_counter() - started
    (out / "cleaning_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def photo_sizes(images: pd.DataFrame, data_dir: Path) -> pd.DataFrame:
    """Each kept photo's width and height as sent (read from its header, nothing decoded): the
    photo-size reference that the served traffic is compared with
    (marketplace_classifier/training/reference.py)."""
    from PIL import Image

    sizes = []
    for image_id in images["id"]:
        with Image.open(data_dir / "images" / f"{image_id}.jpg") as picture:
            sizes.append((image_id, *picture.size))
    return pd.DataFrame(sizes, columns=["id", "width", "height"])


def load_clean_products(out: Path) -> pd.DataFrame:
    frame = pd.read_csv(Path(out) / "products.csv", dtype=str, keep_default_na=False)
    frame["price"] = pd.to_numeric(frame["price"].replace("", None), errors="coerce")
    return typed_products(frame)


def load_clean_images(out: Path) -> pd.DataFrame:
    return pd.read_csv(Path(out) / "images.csv", dtype=str, keep_default_na=False)
