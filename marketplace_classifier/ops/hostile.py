"""Requests that cost more work than their size suggests, or break parsers: the corpus of the
outside hostile-input tests, shared by the served tests, the work-budget benchmark
(marketplace_classifier/benchmarks/budget_bench.py) and the mixed run
(marketplace_classifier/benchmarks/hostile_mix.py).

Each builder returns a `Trigger`: the model it is sent to, its body and content type, and the
statuses an answer may have.
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass

from PIL import Image

REFUSED = frozenset(range(400, 500))


@dataclass(frozen=True)
class Trigger:
    model: str
    body: bytes
    content_type: str
    expected: frozenset[int] = REFUSED  # the statuses a right answer has


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def ordinary_photo(seed: int = 0, size: tuple[int, int] = (480, 360)) -> bytes:
    """A small JPEG of about 25 KB, like the real listings' photos: noise over a colour."""
    noise = Image.effect_noise(size, 20).convert("RGB")
    tint = Image.new("RGB", size, ((37 * seed) % 256, (91 * seed) % 256, (53 * seed) % 256))
    return encoded(Image.blend(noise, tint, 0.6), "JPEG", quality=70)


def progressive_jpeg(size: tuple[int, int], extra_scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated `extra_scans` times: each repeat is a few
    bytes, and each costs the decoder a pass over every block of the picture."""
    data = encoded(Image.new("RGB", size, (120, 80, 40)), "JPEG", progressive=True, quality=90)
    starts = [match.start() for match in re.finditer(rb"\xff\xda", data)]
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[starts[-1]:end] * extra_scans + data[end:]


def lossless_webp(side: int = 7070) -> bytes:
    """A few hundred bytes that decode to side x side pixels (7070: just under 50 M)."""
    return encoded(Image.new("RGB", (side, side), (10, 200, 30)), "WEBP", lossless=True)


def v1(listings: list[dict]) -> bytes:
    return json.dumps({"instances": listings}).encode()


def v1_photos(photos: list[bytes], per_listing: int, text: str | None = None) -> bytes:
    """KServe v1: the photos in listings of `per_listing` photos each, as {"b64": ...}, each
    listing with `text` when given."""
    coded = [{"b64": base64.b64encode(photo).decode()} for photo in photos]
    extra = {"text": text} if text else {}
    return v1([{"images": coded[start:start + per_listing]} | extra
               for start in range(0, len(coded), per_listing)])


def long_integer(digits: int = 5000) -> str:
    return "9" * digits


def nested_b64(depth: int = 985) -> bytes:
    value = '"' + base64.b64encode(ordinary_photo()).decode() + '"'
    for _ in range(depth):
        value = '{"b64": ' + value + "}"
    return ('{"instances": [{"image": ' + value + "}]}").encode()


def other_formats() -> dict[str, bytes]:
    """Files Pillow can open that are no marketplace photo."""
    picture = Image.new("RGB", (64, 48), (200, 120, 30))
    files = {fmt: encoded(picture, fmt) for fmt in ("ICO", "TGA", "PCX", "PPM", "SGI", "IM", "TIFF", "BMP")}
    files["PSD"] = b"8BPS\x00\x01" + bytes(6) + b"\x00\x03" + (48).to_bytes(4, "big") + \
        (64).to_bytes(4, "big") + b"\x00\x08\x00\x03" + bytes(12) + b"\x00\x00" + bytes(64 * 48 * 3)
    files["EPS"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\nshowpage\n"
    return files


def v2_text(shape: str, data: str) -> bytes:
    head = '{"inputs": [{"name": "text", "shape": ' + shape + ', "datatype": "BYTES", "data": '
    return (head + data + "}]}").encode()


def round_one() -> dict[str, Trigger]:
    """Round 1 of the outside test: non-ASCII and huge keys, huge v2 bodies, documents."""
    json_type = "application/json"
    many = 5_000_000
    return {
        "non-ASCII JSON key": Trigger("text", '{"é": 1}'.encode(), json_type),
        "100 KB key": Trigger("text", json.dumps({"k" * 100_000: 1}).encode(), json_type),
        "7 MB key": Trigger("text", json.dumps({"k" * 7_000_000: 1}).encode(), json_type),
        "v1 non-ASCII key": Trigger("text", '{"instances": [{"tëxt": "a"}]}'.encode(), json_type),
        "v2 non-ASCII name": Trigger("text", '{"inputs": [{"name": "tëxt", "shape": [1], "datatype": '
                                             '"BYTES", "data": ["a"]}]}'.encode(), json_type),
        "v2 non-ASCII datatype": Trigger("text", '{"inputs": [{"name": "text", "shape": [1], "datatype": '
                                                 '"BŸTES", "data": ["a"]}]}'.encode(), json_type),
        "v2 5 M rows": Trigger("text", v2_text(f"[{many}]", "[" + ",".join(['""'] * many) + "]"), json_type),
        "v2 nested 900 deep": Trigger("text", v2_text("[1]", "[" * 900 + '"sofa"' + "]" * 900), json_type),
        "non-ASCII content type": Trigger("text", b"sofa", "applic\xe4tion/x; charset=\xe9"),
        "PDF to the image model": Trigger("image", b"%PDF-1.7\n" + bytes(2000), "application/octet-stream"),
        "SVG to the image model": Trigger("image", b'<svg xmlns="http://www.w3.org/2000/svg"/>',
                                          "image/svg+xml"),
    }


def triggers() -> dict[str, Trigger]:
    """Round 2 of the outside test: each request stays inside the byte caps."""
    json_type = "application/json"
    photo = ordinary_photo()
    found = {
        "progressive JPEG repeating one scan": Trigger(
            "image", progressive_jpeg((7000, 7000), 3000), "image/jpeg"),
        "two progressive JPEGs in one listing": Trigger(
            "image", v1([{"images": [base64.b64encode(progressive_jpeg((7000, 7000), 2000)).decode(),
                                     base64.b64encode(progressive_jpeg((6000, 6000), 2000)).decode()]}]),
            json_type),
        "3 KB of 7070x7070 WebPs, v1 5 x 10": Trigger("image", v1_photos([lossless_webp()] * 50, 10),
                                                      json_type),
        "v1 32 listings x 10 ordinary photos": Trigger("image", v1_photos([photo] * 320, 10), json_type,
                                                       frozenset({413})),
        "5,000-digit top_k": Trigger("text", ('{"text": "sofa", "top_k": ' + long_integer() + "}").encode(),
                                     json_type),
        "5,000-digit min_confidence": Trigger(
            "text", ('{"text": "sofa", "min_confidence": ' + long_integer() + "}").encode(), json_type),
        "5,000-digit v2 shape": Trigger(
            "text", ('{"inputs": [{"name": "text", "shape": [' + long_integer() +
                     '], "datatype": "BYTES", "data": ["sofa"]}]}').encode(), json_type),
        "5,000-digit v2 parameter": Trigger(
            "text", ('{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["sofa"]}], '
                     '"parameters": {"top_k": ' + long_integer() + "}}").encode(), json_type),
        "v1 b64 nested 985 deep": Trigger("image", nested_b64(), json_type),
    }
    for name, data in other_formats().items():
        found[f"{name} file to the image model"] = Trigger("image", data, "application/octet-stream")
    return found
