"""What the models train on: labelled samples per split, read from a cleaned folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from marketplace_classifier.serving.model_kinds import ModelKind, model_kind
from marketplace_classifier.serving.processing import listing_text
from marketplace_classifier.serving.settings import LABELS_FILE, read_index_to_name
from marketplace_classifier.serving.taxonomy import Taxonomy
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
    taxonomies: dict = field(default_factory=dict, repr=False)  # learned ones, by their rule
    image_folders: dict[str, Path] = field(default_factory=dict, repr=False)  # reviewed photos' folder
    reviewed: dict[str, int] = field(default_factory=dict)  # what the reviewed listings added, left out

    @classmethod
    def load(cls, folder: Path, reviewed: Path | None = None) -> CleanData:
        """The cleaned folder; with `reviewed` (a cleaned folder of reviewers' decisions), those
        listings join the training split only (see `with_reviewed`)."""
        folder = Path(folder)
        check_cleaned(folder)
        index_to_name = read_index_to_name(folder / LABELS_FILE)
        products = load_clean_products(folder)
        products = products.merge(read_splits(folder), left_on="id", right_on="product_id", how="left")
        if products["split"].isna().any():
            raise ValueError(f"{folder}/splits.csv misses some products: run `marketplace-classifier split`")
        images = load_clean_images(folder)
        image_size = json.loads((folder / "cleaning.json").read_text())["image_size"]
        image_folders, report = {}, {}
        if reviewed is not None:
            products, images, image_folders, report = with_reviewed(products, images, Path(reviewed),
                                                                    index_to_name, image_size)
        labels = name_to_index(index_to_name)
        products["label"] = products["root_category"].astype(str).map(labels).astype("int64")
        products["text"] = [listing_text(name, description) for name, description
                            in zip(products["product_name"], products["product_description"], strict=True)]
        images = images.merge(
            products[["id", "label", "split", "text", "category"]], left_on="product_id", right_on="id",
            suffixes=("", "_product")).drop(columns=["id_product"])
        return cls(folder, products.reset_index(drop=True), images.reset_index(drop=True),
                   index_to_name, image_size, image_folders=image_folders, reviewed=report)

    def samples(self, kind: str | ModelKind, split: str | None = None) -> pd.DataFrame:
        """Photos for image and combined models (each with its product's text), products for text."""
        frame = self.images if model_kind(kind).per_photo else self.products
        if split is not None:
            frame = frame[frame["split"] == split]
        return frame.reset_index(drop=True)

    def image_path(self, image_id: str) -> Path:
        return self.image_folders.get(image_id, self.folder / "images") / f"{image_id}.jpg"

    @property
    def num_classes(self) -> int:
        return len(self.index_to_name)

    @property
    def roots(self) -> list[str]:
        return [self.index_to_name[str(i)] for i in range(self.num_classes)]

    def taxonomy(self, levels: int, min_listings: int) -> Taxonomy:
        """The category tree of the training split's listings (serving/taxonomy.py), cut at
        `levels` levels, rarer categories than `min_listings` folded into their parents."""
        if (levels, min_listings) not in self.taxonomies:
            train = self.products[self.products["split"] == "train"]
            self.taxonomies[levels, min_listings] = Taxonomy.learn(train["category"].astype(str), self.roots,
                                                                   levels, min_listings)
        return self.taxonomies[levels, min_listings]

    @staticmethod
    def levels_labels(samples: pd.DataFrame, taxonomy: Taxonomy | None) -> torch.Tensor:
        """The levels head's class of each sample (-1: none, its path ends at its root)."""
        if taxonomy is None or not taxonomy.terminals:
            return torch.full((len(samples),), -1, dtype=torch.long)
        return torch.tensor([taxonomy.terminal_index(path) for path in samples["category"].astype(str)],
                            dtype=torch.long)


def check_cleaned(folder: Path) -> None:
    if not (folder / "products.csv").exists():
        raise FileNotFoundError(f"{folder} is not a cleaned folder: run `marketplace-classifier clean`")


def with_reviewed(products: pd.DataFrame, images: pd.DataFrame, reviewed: Path,
                  index_to_name: dict[str, str], image_size: int
                  ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Path], dict[str, int]]:
    """The base folder's products and photos with the reviewed listings added to the training
    split: a listing the base holds in validation or test is left out (it would leak into
    training); one it trains on already takes the reviewer's category and photos (a correction);
    one whose root the models do not know is left out. The counts say which."""
    check_cleaned(reviewed)
    reviewed_size = json.loads((reviewed / "cleaning.json").read_text())["image_size"]
    if reviewed_size != image_size:
        raise ValueError(f"{reviewed} was cleaned at {reviewed_size} px and the data at {image_size} px: "
                         f"clean it again with --size {image_size}")
    extra = load_clean_products(reviewed)
    held_out = set(products.loc[products["split"] != "train", "id"])
    known = set(index_to_name.values())
    leaking = extra["id"].isin(held_out)
    unknown = ~extra["root_category"].astype(str).isin(known)
    kept = extra[~leaking & ~unknown].assign(split="train", product_id=lambda frame: frame["id"])
    corrected = products["id"].isin(set(kept["id"]))
    extra_images = load_clean_images(reviewed)
    extra_images = extra_images[extra_images["product_id"].isin(set(kept["id"]))]
    report = {"added": int((~kept["id"].isin(set(products["id"]))).sum()),
              "corrected": int(corrected.sum()), "left_out_held_out": int(leaking.sum()),
              "left_out_unknown_root": int((unknown & ~leaking).sum())}
    products = pd.concat([products[~corrected], kept[products.columns]], ignore_index=True)
    images = pd.concat([images[~images["product_id"].isin(set(kept["id"]))], extra_images], ignore_index=True)
    folders = dict.fromkeys(extra_images["id"], reviewed / "images")
    return products, images, folders, report

