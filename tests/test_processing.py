import io

import pytest
import torch
from PIL import Image

from marketplace_classifier.serving.processing import (
    InputError,
    decode_image,
    describe_probabilities,
    fit_to_square,
    listing_text,
    model_image_from_bytes,
    to_rgb,
)
from marketplace_classifier.serving.settings import LexicalSettings, TextSettings


def _bytes(picture: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I;16"])
def test_any_mode_becomes_rgb(mode):
    assert to_rgb(Image.new(mode, (8, 6))).mode == "RGB"


def test_fit_to_square_keeps_aspect_and_pads_black():
    picture = fit_to_square(Image.new("RGB", (200, 100), (255, 255, 255)), 50)
    assert picture.size == (50, 50)
    assert picture.getpixel((25, 2)) == (0, 0, 0) and picture.getpixel((25, 25)) == (255, 255, 255)


def test_decode_refuses_broken_and_oversized_images():
    data = _bytes(Image.new("RGB", (100, 100), (10, 200, 30)))
    with pytest.raises(InputError, match="not a readable image"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable image"):
        decode_image(b"definitely not an image")
    with pytest.raises(InputError, match="empty"):
        decode_image(b"")
    with pytest.raises(InputError, match="too large"):
        decode_image(_bytes(Image.new("L", (3000, 3000)), "PNG"), max_pixels=1_000_000)


def test_exif_orientation_is_applied():
    picture = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = picture.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (20, 40)


def test_draft_decoding_gives_the_model_input_size():
    data = _bytes(Image.new("RGB", (1000, 750), (0, 90, 200)))
    tensor = model_image_from_bytes(data, 224)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.uint8


def test_listing_text_puts_the_name_first_and_drops_boilerplate():
    text = listing_text("Kettle | in Derby, Derbyshire | Gumtree",
                        "Posted by Amy in Small Appliances in Derby. Works well.")
    assert text == "Kettle Works well."
    assert listing_text("Kettle", None) == "Kettle"


def test_describe_probabilities_orders_and_maps_names():
    names = {"0": "a", "1": "b", "2": "c"}
    answer = describe_probabilities([0.2, 0.5, 0.3], names, top_k=2)
    assert answer["category"] == "b" and answer["probability"] == 0.5
    assert [item["category"] for item in answer["top_k"]] == ["b", "c"]
    assert answer["probabilities"] == {"a": 0.2, "b": 0.5, "c": 0.3}


def test_lexical_ids_are_stable_hashed_n_grams():
    from marketplace_classifier.serving.processing import lexical_batch, lexical_ids, lexical_terms

    settings = LexicalSettings(buckets=1000, max_chars=5_000)
    terms = lexical_terms("PS4 Pro", settings)
    assert {"w ps4", "w pro", "b ps4 pro", "c  p", "c ps4 "} <= set(terms)
    ids, counts = lexical_ids("kettle kettle toaster", settings)
    assert ids == sorted(set(ids)) and all(1 <= i < 1000 for i in ids)
    assert lexical_ids("kettle kettle toaster", settings) == (ids, counts)  # no per-process hash seed
    assert max(counts) == 2 and len(counts) == len(ids)
    cut = LexicalSettings(buckets=1000, max_chars=5)
    assert lexical_ids("a" * 10 + " tail", cut) == lexical_ids("aaaaa", settings)
    batch_ids, batch_counts = lexical_batch(["kettle", "kettle kettle toaster"], settings)
    assert batch_ids.shape == batch_counts.shape and (batch_ids[0] == 0).sum() > 0


def test_the_first_words_also_count_as_terms_of_their_own():
    from marketplace_classifier.serving.processing import lexical_ids, lexical_terms

    plain_settings, headed_settings = LexicalSettings(1000, 5_000), LexicalSettings(1000, 5_000, head_words=2)
    plain = lexical_terms("Dyson fan, see the Dyson logo", plain_settings)
    headed = lexical_terms("Dyson fan, see the Dyson logo", headed_settings)
    assert headed[:len(plain)] == plain  # the plain terms unchanged
    extra = headed[len(plain):]
    assert {"nw dyson", "nw fan", "nb dyson fan"} <= set(extra) and "nw logo" not in extra
    assert lexical_ids("Dyson fan", headed_settings) != lexical_ids("Dyson fan", plain_settings)


@pytest.mark.parametrize(("kind", "count"), [("image", 1), ("text", 4), ("combined", 5)])
def test_model_inputs_follow_one_contract(kind, count):
    from marketplace_classifier.serving.processing import model_inputs
    from marketplace_classifier.training.text_encoder import load_tokenizer

    images = [torch.zeros(3, 8, 8, dtype=torch.uint8)] * 2
    texts = ["oak table", "a kettle that boils"]
    settings = TextSettings(max_length=8, lexical=LexicalSettings(buckets=64, max_chars=100))
    inputs = model_inputs(kind, images, texts, load_tokenizer("minilm"), settings)
    assert len(inputs) == count and all(tensor.shape[0] == 2 for tensor in inputs)
    assert len(model_inputs("text", None, texts, load_tokenizer("minilm"), TextSettings(8))) == 2


def _natural_photo(width: int, height: int, seed: int) -> bytes:
    """Gradients, shapes, blur and sensor noise, saved as a camera would (JPEG q88)."""
    import numpy as np
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    x, y = np.linspace(0, 1, width)[None, :, None], np.linspace(0, 1, height)[:, None, None]
    base = np.concatenate([x * 200 + 30 + 0 * y, y * 180 + 40 + 0 * x, (x + y) * 90 + 20], axis=2)
    picture = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(30):
        left, top, radius = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 200)
        draw.ellipse([left, top, left + radius, top + radius], fill=tuple(map(int, rng.integers(0, 255, 3))))
    noisy = np.asarray(picture.filter(ImageFilter.GaussianBlur(1.5))).astype(np.int16)
    noisy = noisy + rng.integers(-12, 12, noisy.shape)
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=88)
    return buffer.getvalue()


@pytest.mark.parametrize(("width", "height"), [(1000, 750), (480, 640), (3000, 2000), (300, 300)])
@pytest.mark.parametrize("size", [224, 260])
def test_training_and_serving_prepare_a_photo_alike(width, height, size, tmp_path):
    """Training reads the cleaned copy (fit to 512, JPEG q95, then fit to the model size);
    serving decodes the raw photo in draft mode and fits it once. They must stay close."""
    from marketplace_classifier.training.cleaning import ImageJob, clean_one_image
    from marketplace_classifier.training.features import load_model_image

    raw = _natural_photo(width, height, seed=width + height)
    (tmp_path / "raw.jpg").write_bytes(raw)
    job = ImageJob("photo", str(tmp_path / "raw.jpg"), str(tmp_path / "clean.jpg"), 512)
    assert clean_one_image(job) is None
    trained_on = load_model_image(tmp_path / "clean.jpg", size).float()
    served = model_image_from_bytes(raw, size).float()
    difference = (trained_on - served).abs()
    assert difference.mean() <= 3.0  # grey levels of 255; measured 0.8-1.9 on these photos
    assert torch.quantile(difference.flatten()[::7], 0.99) <= 40
