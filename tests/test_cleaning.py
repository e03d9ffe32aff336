import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from marketplace_classifier.serving.settings import read_index_to_name
from marketplace_classifier.training.cleaning import (
    CleaningReport,
    check_clean_images,
    clean,
    clean_products,
    load_clean_products,
    parse_price,
    read_raw_images,
    read_raw_products,
)
from marketplace_classifier.training.sample import SampleConfig, generate
from tests.helpers import REAL_DATA, tree_digest


def test_carriage_returns_do_not_split_records(raw_sample):
    folder, summary = raw_sample
    raw = read_raw_products(folder / "Products.csv")
    assert len(raw) == summary["products"]
    assert raw["product_description"].str.contains("\r").sum() == summary["quirks"]["carriage_returns"]


def test_crlf_line_ends_do_not_leak_into_the_last_column(raw_sample):
    folder, _ = raw_sample
    assert b"\r\n" in (folder / "Images.csv").read_bytes()
    images = read_raw_images(folder / "Images.csv")
    assert images["create_time"].str.match(r"^\d\d/\d\d/\d{4}$").all()


@pytest.mark.skipif(not REAL_DATA.exists(), reason="real marketplace data not beside the project")
def test_real_export_reads_as_5044_products():
    assert len(read_raw_products(REAL_DATA / "Products.csv")) == 5044


@pytest.mark.parametrize(("text", "value"), [
    ("£1,200.00", 1200.0), ("Â£5.00", 5.0), ("£0.00", 0.0), ("£12,345,678.50", 12345678.5)])
def test_prices_parse_to_floats(text, value):
    assert parse_price(text) == value


def test_unreadable_price_is_nan():
    assert np.isnan(parse_price("free to collector"))


def test_clean_products_types_and_boilerplate(clean_sample, raw_sample):
    out, report = clean_sample
    products = load_clean_products(out)
    assert products["price"].dtype == "float64"
    assert isinstance(products["root_category"].dtype, pd.CategoricalDtype)
    assert len(products["root_category"].cat.categories) == 13
    assert products["id"].is_unique
    assert not products["product_name"].str.contains("Gumtree").any()
    assert not products["product_name"].str.contains(r"\| in ").any()
    assert not products["product_description"].str.contains("Posted by").any()
    assert not products["product_description"].str.contains("\r").any()
    assert len(products) == raw_sample[1]["products"] - raw_sample[1]["quirks"]["duplicate_rows"]


def test_boilerplate_stripping_keeps_the_rest():
    raw = pd.DataFrame([{
        "id": "a", "product_name": "Oak table | in Leeds, West Yorkshire | Gumtree",
        "category": "Home & Garden / Dining, Living Room Furniture",
        "product_description": "Solid oak. Posted by Tom in Dining, Living Room Furniture in Leeds. "
                               "Seats six.",
        "price": "£40.00", "location": "Leeds, West Yorkshire"}])
    cleaned = clean_products(raw, CleaningReport())
    assert cleaned.loc[0, "product_name"] == "Oak table"
    assert cleaned.loc[0, "product_description"] == "Solid oak. Seats six."


def test_report_lists_every_dropped_item_with_its_reason(clean_sample, raw_sample):
    folder, summary = raw_sample
    out, report = clean_sample
    saved = json.loads((out / "cleaning_report.json").read_text())
    assert saved["products_in"] == summary["products"]
    assert saved["products_out"] + len(saved["dropped_products"]) == saved["products_in"]
    assert saved["images_out"] + len(saved["dropped_images"]) == saved["images_in"]
    images = pd.read_csv(folder / "Images.csv", index_col=0)
    missing = {i for i in images["id"] if not (folder / "images" / f"{i}.jpg").exists()}
    dropped = {item["id"]: item["reason"] for item in saved["dropped_images"]}
    assert {i for i, reason in dropped.items() if reason == "image file missing"} == missing
    assert sum("truncated" in reason for reason in dropped.values()) == 1
    assert saved["dropped_product_reasons"] == {
        "exact duplicate of an earlier product row": summary["quirks"]["duplicate_rows"]}
    assert any("no description" in note for note in saved["notes"])


def test_cleaned_images_are_square_rgb_and_keep_aspect(clean_sample, raw_sample):
    folder, _ = raw_sample
    out, _ = clean_sample
    assert check_clean_images(out, 64) == []
    kept = pd.read_csv(out / "images.csv")
    for image_id in kept["id"][:40]:
        with Image.open(folder / "images" / f"{image_id}.jpg") as source:
            width, height = source.size
        cleaned = np.asarray(Image.open(out / "images" / f"{image_id}.jpg"))
        assert cleaned.shape == (64, 64, 3)
        if width > height * 1.2:  # landscape: black bands top and bottom, content full width
            band = round((64 - 64 * height / width) / 2)
            assert cleaned[: max(0, band - 2)].max(initial=0) < 30
            assert cleaned[32, 2:-2].mean() > 30


def test_index_to_name_is_sorted_root_categories(clean_sample):
    mapping = read_index_to_name(clean_sample[0] / "index_to_name.json")
    assert list(mapping.values()) == sorted(mapping.values())
    assert len(mapping) == 13 and mapping["0"] == "Appliances"


def test_cleaning_never_writes_to_its_input_and_is_idempotent(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    generate(raw, SampleConfig(products=30, seed=5))
    before = tree_digest(raw)
    first = clean(raw, out, size=48, workers=1)
    cleaned_before = tree_digest(out / "images")
    second = clean(raw, out, size=48, workers=1)
    assert tree_digest(raw) == before
    assert second.images_reused == first.images_out
    assert tree_digest(out / "images") == cleaned_before
    assert (second.products_out, second.images_out) == (first.products_out, first.images_out)

    changed = pd.read_csv(out / "images.csv")["id"][0]
    Image.new("RGB", (30, 90), (255, 0, 0)).save(raw / "images" / f"{changed}.jpg")
    third = clean(raw, out, size=48, workers=1)
    assert third.images_reused == first.images_out - 1
    assert np.asarray(Image.open(out / "images" / f"{changed}.jpg"))[24, 24, 0] > 200


def test_output_inside_input_is_refused(tmp_path):
    generate(tmp_path / "raw", SampleConfig(products=3, seed=0))
    with pytest.raises(ValueError, match="outside the input"):
        clean(tmp_path / "raw", tmp_path / "raw" / "clean")


def test_interrupted_cleaning_resumes_without_redoing_work_or_leaving_bad_images(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    raw, out = tmp_path / "raw", tmp_path / "out"
    generate(raw, SampleConfig(products=900, seed=9))
    def child_setup() -> None:
        os.nice(19)  # so that this loop, which must see the cleaner half done, is never starved
        # a shell's background jobs inherit SIGINT ignored, and Python keeps an ignored SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen([sys.executable, "-m", "marketplace_classifier.training",
                                "clean", "--data-dir", str(raw),
                                "--out", str(out), "--image-size", "64", "--workers", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=child_setup)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "images").exists() and len(list((out / "images").iterdir())) >= 150:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the cleaner finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
    finished = len(json.loads((out / "images_manifest.json").read_text()))
    assert finished >= 150

    report = clean(raw, out, size=64, workers=1)
    assert report.images_reused == finished  # nothing finished was redone
    assert check_clean_images(out, 64) == []
    assert not list((out / "images").glob("*.partial"))
