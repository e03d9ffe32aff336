"""Reading one request of a batch: raw bytes, text, JSON or multipart parts, REST or gRPC."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field

from marketplace_classifier.serving.processing import (
    InputError,
    OverBudget,
    UnsupportedMediaType,
    free_text,
    listing_text,
    quote,
    quote_all,
)

BODY_KEYS = ("data", "body")
FIELDS = ("image", "images", "text", "product_name", "product_description", "top_k", "min_confidence",
          "explain")
# Multipart parts and gRPC inputs are a map by name in TorchServe's worker, so a listing's
# further photos are named image_1, image_2, ... (repeated parts named `image` would collapse).
EXTRA_PHOTO = re.compile(r"image_[1-9][0-9]{0,2}")
DEFAULT_MAX_PHOTOS = 10
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
DEFAULT_TOP_K = 3
# An empty type is what gRPC requests carry.
ACCEPTED_TYPES = ("application/json", "application/octet-stream", "multipart/form-data")
MAX_FIELDS = 32  # more parts than this in one request is not a listing
# Values (list entries, object members) one JSON body may hold: the largest request any protocol
# admits (64 listings of 10 photo slots and every other field: about 1,300) with room to spare.
# json.loads of a 20 MB `[{},{},...]` builds 6.6 million objects (half a gigabyte) before any
# other check could look at them, so this is counted on the body's bytes first.
MAX_JSON_VALUES = 4096
JSON_STRING = re.compile(rb'"[^"]*"')  # once escaped quotes and backslashes are taken out


@dataclass
class Listing:
    """What a request asks about: its photos and/or text, how many top classes to return, and
    the confidence below which the caller wants it reviewed (None: the model's threshold)."""

    images: list[bytes] = field(default_factory=list)
    text: str | None = None
    top_k: int = DEFAULT_TOP_K
    min_confidence: float | None = None
    explain: bool = False  # add why the model answered what it did (serving/explain.py)

    @property
    def image(self) -> bytes | None:
        return self.images[0] if self.images else None


def parse_request(request: dict, content_type: str | None, needs: frozenset[str],
                  num_classes: int, max_photos: int = DEFAULT_MAX_PHOTOS) -> Listing:
    """Turn one request into a Listing, or raise InputError saying what is wrong with it."""
    return parse_fields(read_fields(request, content_type, needs), needs, num_classes, max_photos)


def parse_fields(fields: dict, needs: frozenset[str], num_classes: int,
                 max_photos: int = DEFAULT_MAX_PHOTOS, text_only_allowed: bool = False) -> Listing:
    """The named fields of one listing (photos, text, top_k, min_confidence) -> a Listing, or
    InputError. `text_only_allowed`: a listing without photos is answered from its text."""
    if not isinstance(fields, dict):
        raise InputError(f"a listing must be an object with some of {list(FIELDS)}, "
                         f"not {type(fields).__name__}")
    if len(fields) > MAX_FIELDS:
        raise InputError(f"too many fields ({len(fields)}); a listing has some of {list(FIELDS)}")
    unknown = [name for name in fields if name not in FIELDS and not EXTRA_PHOTO.fullmatch(str(name))]
    if unknown:
        raise InputError(f"unknown field(s) {quote_all(unknown)}; expected some of {list(FIELDS)} "
                         "or image_1, image_2, ...")
    listing = Listing(images=_images(fields, max_photos) if "image" in needs else [],
                      text=_text(fields), top_k=_top_k(fields.get("top_k"), num_classes),
                      min_confidence=_min_confidence(fields.get("min_confidence")),
                      explain=_explain(fields.get("explain")))
    if "image" in needs and not listing.images and not (text_only_allowed and listing.text):
        raise InputError("no image: send the photo as the body, as multipart parts or gRPC inputs "
                         "named 'image', 'image_1', ..., or base64-encoded in the JSON field "
                         "'image' or the list 'images'")
    if "text" in needs and listing.text is None:
        raise InputError("no text: send text/plain, or JSON with 'text' or "
                         "'product_name'/'product_description'")
    return listing


def check_content_type(content_type: str) -> str:
    """The media type, lower case ("" for none), or UnsupportedMediaType."""
    media = content_type.split(";")[0].strip().lower()
    if media and media not in ACCEPTED_TYPES and not media.startswith(("image/", "text/")):
        raise UnsupportedMediaType(
            f"unsupported content type {quote(media)}; send image/*, application/octet-stream, "
            "text/plain, application/json or multipart/form-data")
    return media


def read_fields(request: dict, content_type: str | None,
                needs: frozenset[str] = frozenset({"image", "text"})) -> dict:
    """One TorchServe request -> its fields: multipart parts, gRPC inputs, a JSON object, or
    {'image': bytes} / {'text': bytes} for a raw body (always the photo for a photo-only model)."""
    if not isinstance(request, dict):
        raise InputError("malformed request")
    media = check_content_type(content_type or "")
    parts = {key: value for key, value in request.items() if key not in BODY_KEYS}
    body_keys = [key for key in BODY_KEYS if key in request]
    if parts and body_keys:
        # Inputs beside a body can only come from the URL (TorchServe 0.12 drops the query string
        # before the handler; an engine that passes it must not let it replace the body).
        raise InputError(f"inputs in the URL's query string are not accepted ({quote_all(parts)}); "
                         "send every field in the body")
    if parts:  # multipart form parts, or a gRPC input map
        return parts
    body = next((request[key] for key in body_keys if request.get(key) is not None), None)
    if body is None or (isinstance(body, (bytes, bytearray, str)) and len(body) == 0):
        raise InputError("empty request body")
    if not isinstance(body, (bytes, bytearray, str)):  # JSON the server already decoded
        return _json_object(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    return _raw_body_fields(bytes(body), media, needs)


def _raw_body_fields(body: bytes, media: str, needs: frozenset[str]) -> dict:
    """A body that is not multipart: the content type decides what it is ("[NEW] PS5" sent as
    text/plain is a title, not JSON); only a body without one (or octet-stream) is sniffed."""
    if media.endswith(("/json", "+json")):
        return _json_object(_load_json(body))
    if media.startswith("text/"):
        return {"text": body}
    if media.startswith("image/"):
        return {"image": body}
    if body.lstrip()[:1] in (b"{", b"["):
        return _json_object(_load_json(body))
    if body.startswith(IMAGE_SIGNATURES) or needs == {"image"}:
        return {"image": body}
    return {"text": body}


def json_values(body: bytes) -> int:
    """About how many values a JSON body holds: one more than its commas outside strings (every
    list entry or object member after the first follows one; depth is checked by the parser),
    counted on its bytes without building anything, in linear time on any input."""
    rough = body.count(b",") + 1
    if rough <= MAX_JSON_VALUES:  # the common case: no copy of the body at all
        return rough
    structure = JSON_STRING.sub(b"", body.replace(b"\\\\", b"").replace(b'\\"', b""))
    return structure.count(b",") + 1


def check_json_size(body: bytes) -> None:
    """Refuse (413) a JSON body with more values than any request may hold, before parsing it."""
    values = json_values(body)
    if values > MAX_JSON_VALUES:
        raise OverBudget(f"the JSON body holds about {values} values; a request holds at most "
                         f"{MAX_JSON_VALUES} (64 listings of at most {DEFAULT_MAX_PHOTOS} photos)")


def _load_json(body: bytes):
    check_json_size(body)
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise InputError("JSON body is not valid UTF-8") from error
    except RecursionError as error:
        raise InputError("JSON body is nested too deeply") from error
    except json.JSONDecodeError as error:
        raise InputError(f"body is not valid JSON: {error.msg} at position {error.pos}") from error
    except ValueError as error:  # e.g. an integer of more than 4,300 digits
        raise InputError("body is not valid JSON: a number in it is too long") from error


def _json_object(value) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"JSON body must be an object with some of {list(FIELDS)}, "
                         f"not {type(value).__name__}")
    return value


def _images(fields: dict, max_photos: int) -> list[bytes]:
    """The listing's photos in the order sent: `image`, then `image_1`, `image_2`, ... by number,
    or the JSON list `images`; at most `max_photos`."""
    named = sorted((name for name in fields if EXTRA_PHOTO.fullmatch(str(name))),
                   key=lambda name: int(name[6:]))
    listed = fields.get("images")
    if listed is not None and not isinstance(listed, list):
        raise InputError(f"field 'images' must be a list of base64 photos, not {type(listed).__name__}")
    if listed is not None and ("image" in fields or named):
        raise InputError("send the photos either as 'images' or as 'image', 'image_1', ..., not both")
    values = listed if listed is not None else \
        [fields[name] for name in ("image", *named) if fields.get(name) is not None]
    if len(values) > max_photos:
        raise InputError(f"{len(values)} photos in one listing; this model takes at most {max_photos}")
    photos = []
    for position, value in enumerate(values):
        try:
            photos.append(_image(value))
        except InputError as error:
            raise InputError(f"photo {position + 1} of {len(values)}: {error}") from error
    return photos


def _min_confidence(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, str)):
        try:
            value = float(value)
        except ValueError as error:
            raise InputError("field 'min_confidence' must be a number from 0 to 1") from error
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 1:
        raise InputError("field 'min_confidence' must be a number from 0 to 1")
    return float(value)


def _image(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        if not data.startswith(IMAGE_SIGNATURES):
            data = _maybe_base64(data) or data  # multipart/gRPC parts may carry base64 text
        return data
    if isinstance(value, str):
        decoded = _maybe_base64(value.encode("ascii", errors="replace"))
        if not decoded:
            raise InputError("not valid base64")
        return decoded
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        return _image(value["b64"])  # KServe v1's mark for binary values, one level deep
    if isinstance(value, dict):
        raise InputError("a photo object must be {\"b64\": base64 text}")
    raise InputError(f"a photo must be base64 text or bytes, not {type(value).__name__}")


def _maybe_base64(data: bytes) -> bytes | None:
    if data.startswith(b"data:") and b"," in data[:100]:
        data = data.split(b",", 1)[1]  # data URLs
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _as_str(name: str, value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"'{name}' is not valid UTF-8 text") from error
    if not isinstance(value, str):
        raise InputError(f"field '{name}' must be a string, not {type(value).__name__}")
    return value


def _text(fields: dict) -> str | None:
    text = _as_str("text", fields.get("text"))
    name = _as_str("product_name", fields.get("product_name"))
    description = _as_str("product_description", fields.get("product_description"))
    if text is None and name is None and description is None:
        return None
    if text is not None and (name is not None or description is not None):
        raise InputError("send either 'text' or 'product_name'/'product_description', not both")
    composed = free_text(text) if text is not None else listing_text(name, description)
    if not composed.strip():
        raise InputError("text is empty")
    return composed


def _explain(value) -> bool:
    """A JSON boolean, or the text true/false/1/0 of a form part or gRPC input."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", errors="replace")
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise InputError("field 'explain' must be true or false")


def _top_k(value, num_classes: int) -> int:
    if value is None:
        return DEFAULT_TOP_K
    if isinstance(value, (bytes, bytearray, str)):
        try:
            value = int(value)
        except ValueError as error:
            raise InputError("field 'top_k' must be an integer") from error
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_classes:
        raise InputError(f"field 'top_k' must be an integer from 1 to {num_classes}")
    return value
