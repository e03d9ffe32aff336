"""What the models train on: labelled samples per split, read from a cleaned folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from marketplace_classifier.serving.model_kinds import ModelKind, model_kind
from marketplace_classifier.serving.processing import listing_text
from marketplace_classifier.serving.settings import LABELS_FILE, read_index_to_name
from marketplace_classifier.training.categories import name_to_index
from marketplace_classifier.training.cleaning import load_clean_images, load_clean_products
from marketplace_classifier.training.splits import read_splits


@dataclass
class CleanData:
    """A cleaned folder: products with their text and label, photos, splits, label decoder."""

    folder: Path
    products: pd.DataFrame
    images: pd.DataFrame
    index_to_name: dict[str, str]
    image_size: int

    @classmethod
    def load(cls, folder: Path) -> CleanData:
        folder = Path(folder)
        if not (folder / "products.csv").exists():
            raise FileNotFoundError(f"{folder} is not a cleaned folder: run `marketplace-classifier clean`")
        index_to_name = read_index_to_name(folder / LABELS_FILE)
        labels = name_to_index(index_to_name)
        products = load_clean_products(folder)
        products = products.merge(read_splits(folder), left_on="id", right_on="product_id", how="left")
        if products["split"].isna().any():
            raise ValueError(f"{folder}/splits.csv misses some products: run `marketplace-classifier split`")
        products["label"] = products["root_category"].astype(str).map(labels).astype("int64")
        products["text"] = [listing_text(name, description) for name, description
                            in zip(products["product_name"], products["product_description"], strict=True)]
        images = load_clean_images(folder).merge(
            products[["id", "label", "split", "text"]], left_on="product_id", right_on="id",
            suffixes=("", "_product")).drop(columns=["id_product"])
        image_size = json.loads((folder / "cleaning.json").read_text())["image_size"]
        return cls(folder, products.reset_index(drop=True), images.reset_index(drop=True),
                   index_to_name, image_size)

    def samples(self, kind: str | ModelKind, split: str | None = None) -> pd.DataFrame:
        """Photos for image and combined models (each with its product's text), products for text."""
        frame = self.images if model_kind(kind).per_photo else self.products
        if split is not None:
            frame = frame[frame["split"] == split]
        return frame.reset_index(drop=True)

    def image_path(self, image_id: str) -> Path:
        return self.folder / "images" / f"{image_id}.jpg"

    @property
    def num_classes(self) -> int:
        return len(self.index_to_name)
