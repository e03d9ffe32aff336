"""Train/validation/test assignment by product, stratified by root category."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

SPLITS = ("train", "val", "test")
SPLIT_SETTINGS_FILE = "splits.json"
SPLITS_FILE = "splits.csv"


def assign_splits(products: pd.DataFrame, val_fraction: float = 0.15,
                  test_fraction: float = 0.15, seed: int = 0) -> pd.DataFrame:
    """One row per product id with its split; each category is divided in the same proportions."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("val and test fractions must be in [0, 1) and sum to less than 1")
    rng = random.Random(seed)
    rows = []
    for category in sorted(products["root_category"].astype(str).unique()):
        ids = sorted(products.loc[products["root_category"] == category, "id"].astype(str))
        rng.shuffle(ids)
        n_test = round(len(ids) * test_fraction)
        n_val = round(len(ids) * val_fraction)
        for position, product_id in enumerate(ids):
            split = "test" if position < n_test else "val" if position < n_test + n_val else "train"
            rows.append({"product_id": product_id, "split": split})
    return pd.DataFrame(rows).sort_values("product_id").reset_index(drop=True)


def write_splits(clean_dir: Path, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    from marketplace_classifier.training.cleaning import load_clean_products

    splits = assign_splits(load_clean_products(clean_dir), val_fraction, test_fraction, seed)
    splits.to_csv(Path(clean_dir) / SPLITS_FILE, index=False)
    # how the split was drawn, for the model card (marketplace_classifier/training/card.py)
    (Path(clean_dir) / SPLIT_SETTINGS_FILE).write_text(json.dumps(
        {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}) + "\n")
    return splits


def read_splits(clean_dir: Path) -> pd.DataFrame:
    path = Path(clean_dir) / SPLITS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `marketplace-classifier split` first")
    return pd.read_csv(path, dtype=str)
