import io

import pandas as pd
from PIL import Image

from marketplace_classifier.training.categories import ROOT_CATEGORIES, root_category
from marketplace_classifier.training.sample import SampleConfig, generate
from tests.helpers import tree_digest


def test_generation_is_deterministic_for_a_seed(tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(first, SampleConfig(products=40, seed=7))
    generate(second, SampleConfig(products=40, seed=7))
    generate(other, SampleConfig(products=40, seed=8))
    assert tree_digest(first) == tree_digest(second)
    assert tree_digest(first) != tree_digest(other)


def test_layout_matches_the_real_export(raw_sample):
    folder, _ = raw_sample
    products_header = (folder / "Products.csv").read_text().splitlines()[0]
    images_header = (folder / "Images.csv").read_text().splitlines()[0]
    assert products_header == ",id,product_name,category,product_description,price,location"
    assert images_header == ",id,product_id,bucket_link,image_ref,create_time"
    products = pd.read_csv(folder / "Products.csv", lineterminator="\n", index_col=0)
    images = pd.read_csv(folder / "Images.csv", lineterminator="\n", index_col=0)
    assert products["product_name"].str.endswith(" | Gumtree").all()
    assert products["product_name"].str.contains(r" \| in [^|]+, [^|]+ \| Gumtree$").all()
    assert set(products["category"].map(root_category)) <= set(ROOT_CATEGORIES)
    assert products["category"].str.contains(" / ").all()
    assert products["price"].str.match(r"^(Â)?£[\d,]+\.\d\d$").all()
    assert products["price"].str.startswith("Â£").any()
    assert products["price"].str.contains(",").any()
    per_product = images.groupby("product_id").size()
    assert per_product.min() >= 1 and per_product.max() <= 4
    assert set(images["product_id"]) <= set(products["id"])


def test_messy_quirks_are_present(raw_sample):
    folder, summary = raw_sample
    quirks = summary["quirks"]
    raw = (folder / "Products.csv").read_bytes()
    plain = pd.read_csv(folder / "Products.csv")  # the naive read splits on bare \r
    careful = pd.read_csv(folder / "Products.csv", lineterminator="\n")
    assert b"\r" in raw and len(plain) > len(careful)
    assert careful["product_description"].isna().sum() == quirks["missing_descriptions"] > 0
    assert careful.drop(columns=careful.columns[0]).duplicated().sum() == quirks["duplicate_rows"] > 0
    assert careful["product_description"].str.contains("Posted by").sum() == quirks["posted_by"] > 0

    images = pd.read_csv(folder / "Images.csv", index_col=0)
    files = {path.stem for path in (folder / "images").glob("*.jpg")}
    assert len(set(images["id"]) - files) == quirks["missing_image_files"] > 0
    modes, truncated = set(), 0
    for path in (folder / "images").glob("*.jpg"):
        data = path.read_bytes()
        try:
            picture = Image.open(io.BytesIO(data))
            picture.load()
            modes.add((picture.format, picture.mode))
        except OSError:
            truncated += 1
    assert truncated == 1
    assert {("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "RGB")} <= modes


def test_photos_vary_in_size_and_aspect(raw_sample):
    folder, _ = raw_sample
    sizes = set()
    for path in sorted((folder / "images").glob("*.jpg"))[:60]:
        try:
            with Image.open(path) as picture:
                sizes.add(picture.size)
        except OSError:
            continue
    ratios = {round(width / height, 1) for width, height in sizes}
    assert len(sizes) > 20 and len(ratios) >= 3


def test_refuses_to_overwrite_without_flag(tmp_path):
    generate(tmp_path / "s", SampleConfig(products=5, seed=0))
    try:
        generate(tmp_path / "s", SampleConfig(products=5, seed=0))
    except FileExistsError as error:
        assert "--overwrite" in str(error)
    else:
        raise AssertionError("a second generation into the same folder must be refused")
    generate(tmp_path / "s", SampleConfig(products=5, seed=1), overwrite=True)
    listed = set(pd.read_csv(tmp_path / "s" / "Images.csv", index_col=0)["id"])
    on_disk = {path.stem for path in (tmp_path / "s" / "images").glob("*.jpg")}
    assert on_disk <= listed  # nothing left over from the first sample
