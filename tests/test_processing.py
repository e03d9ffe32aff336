import io

import pytest
import torch
from PIL import Image

from handlers.processing import (
    InputError,
    decode_image,
    describe_probabilities,
    fit_to_square,
    listing_text,
    model_image_from_bytes,
    to_rgb,
)


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
