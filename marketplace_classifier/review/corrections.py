"""Reviewed listings as training data: the marketplace layout (Products.csv, Images.csv,
images/<id>.jpg) with each listing filed under the path its reviewer chose. Training adds such
a folder to the training split only (`train --reviewed DIR`)."""

from __future__ import annotations

import csv
from pathlib import Path

from marketplace_classifier.review.queue import ReviewError, ReviewQueue
from marketplace_classifier.serving.files import staged_folder

PRODUCT_COLUMNS = ["", "id", "product_name", "category", "product_description", "price", "location"]
IMAGE_COLUMNS = ["", "id", "product_id", "bucket_link", "image_ref", "create_time"]


def export_decisions(queue: ReviewQueue, out: Path) -> int:
    """Write every decided listing to `out` (a new folder, written whole or not at all); how many."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ReviewError(f"{out} exists and is not empty: export into a new folder")
    decisions = queue.decisions()
    with staged_folder(out) as folder:
        (folder / "images").mkdir()
        products, images = [], []
        for decision in decisions:
            listing = queue.listing(decision["listing_id"])
            product_id = listing.source_id
            name = listing.product_name if listing.product_name is not None else (listing.text or "")
            products.append([product_id, name, decision["path"], listing.product_description or "", "", ""])
            for position, photo_id in enumerate(listing.photo_ids):
                image_id = f"{product_id}-{position}"
                (folder / "images" / f"{image_id}.jpg").write_bytes(queue.photo(photo_id))
                images.append([image_id, product_id, "", "", ""])
        write_rows(folder / "Products.csv", PRODUCT_COLUMNS, products)
        write_rows(folder / "Images.csv", IMAGE_COLUMNS, images)
    return len(decisions)


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """A CSV as the marketplace exports it: an unnamed index column first."""
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows([str(index), *row] for index, row in enumerate(rows))
