import pandas as pd

from marketplace_classifier.training.cleaning import load_clean_images, load_clean_products
from marketplace_classifier.training.splits import assign_splits, read_splits


def test_splits_are_by_product_and_disjoint(clean_sample):
    out, _ = clean_sample
    splits = read_splits(out)
    products = load_clean_products(out)
    assert splits["product_id"].is_unique
    assert set(splits["product_id"]) == set(products["id"])
    images = load_clean_images(out).merge(splits, on="product_id")
    # no product's photos in two splits
    assert (images.groupby("product_id")["split"].nunique() == 1).all()
    names = products.set_index("id")["product_name"]
    by_split = {name: set(group["product_id"]) for name, group in splits.groupby("split")}
    assert by_split["train"].isdisjoint(by_split["val"] | by_split["test"])
    assert by_split["val"].isdisjoint(by_split["test"])
    assert set(names.index) == set().union(*by_split.values())


def test_splits_are_stratified_and_deterministic(clean_sample):
    products = load_clean_products(clean_sample[0])
    first = assign_splits(products, 0.2, 0.2, seed=1)
    assert first.equals(assign_splits(products, 0.2, 0.2, seed=1))
    assert not first.equals(assign_splits(products, 0.2, 0.2, seed=2))
    merged = first.merge(products[["id", "root_category"]], left_on="product_id", right_on="id")
    shares = pd.crosstab(merged["root_category"], merged["split"], normalize="index")
    assert (shares["train"] > 0.45).all() and (shares["test"] < 0.35).all()
