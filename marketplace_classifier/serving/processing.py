"""Pre- and post-processing shared by training and serving.

Training imports this module and every archive ships it, so the two sides cannot
drift: one implementation of decoding, resizing, padding, text composition,
tokenization and label mapping.
"""

from __future__ import annotations

import io
import re
import warnings
import zlib
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageOps

from marketplace_classifier.serving.model_kinds import ModelKind, model_kind
from marketplace_classifier.serving.settings import PAD_COLOUR, LexicalSettings, TextSettings

# Photos beyond this many pixels are refused before decoding (decompression bombs).
DEFAULT_MAX_PIXELS = 50_000_000
# Each text field is cut to this many characters before any cleaning or tokenizing: the model
# reads at most a few hundred tokens, so a megabyte of text must cost no more than this.
MAX_FIELD_CHARS = 10_000
# How much of a request's own content an error message may quote.
QUOTE_CHARS = 40

_NAME_SUFFIX = re.compile(r"\s*\|\s*in\s+[^|]*\|\s*Gumtree\s*$", re.IGNORECASE)
_POSTED_BY = re.compile(r"Posted by\b[^.]*\.?", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


class InputError(ValueError):
    """A request or data item that cannot be processed; the message says why, in words safe to
    send back (see quote)."""

    status = 400


class UnsupportedMediaType(InputError):
    status = 415


class OverBudget(InputError):
    """A request that asks for more work than one request may cost."""

    status = 413


class AnswerTimedOut(InputError):
    """The model's answer took longer than the serving plan's response timeout."""

    status = 504


class BatchBudgetSpent(InputError):
    """A request that fits the budget alone, but not beside the cheaper requests of its batch:
    try again (the worker's time for this batch is spoken for)."""

    status = 503


def quote(value, limit: int = QUOTE_CHARS) -> str:
    """Request content fit for an error message: ASCII-escaped, at most `limit` characters
    quoted, with the full length said when cut."""
    text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
    shown = ascii(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


def ascii_message(text: str, limit: int) -> str:
    """A message safe for any status line or log: ASCII only, at most about `limit` characters."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    escaped = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in escaped[:limit])
    return escaped if len(text) <= limit else f"{escaped}... (cut)"


def quote_all(values, count: int = 5) -> str:
    """A few quoted values and how many there were."""
    values = list(values)
    shown = ", ".join(quote(value) for value in values[:count])
    return f"[{shown}]" if len(values) <= count else f"[{shown}, ... {len(values)} in all]"


# ---------------------------------------------------------------- images
# The formats a marketplace photo arrives in; Pillow's other plugins (PSD, ICO, TGA, PCX, PPM,
# SGI, IM, EPS through Ghostscript, ...) never see a request's bytes. MPO (phones' JPEGs) is read
# by the JPEG plugin.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
PHOTO_FORMAT_NAMES = "JPEG, PNG, WebP or GIF"
JPEG_FORMATS = ("JPEG", "MPO")  # what Pillow's JPEG plugin reports
_START_OF_SCAN = b"\xff\xda"


def jpeg_scans(data: bytes) -> int:
    """How many scans a JPEG's bytes hold: an upper bound read without decoding (a marker that
    the entropy-coded data cannot contain, so only an embedded thumbnail adds to it). Each scan
    of a progressive JPEG costs a pass over every block of the picture."""
    return data.count(_START_OF_SCAN)


def open_photo(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_scans: int | None = None) -> Image.Image:
    """A photo's header, read without decoding it: refuses formats other than PHOTO_FORMATS by
    name, more than `max_pixels`, and JPEGs of more than `max_scans` scans."""
    if not data:
        raise InputError("empty image")
    with _pillow_refusals(data):
        image = Image.open(io.BytesIO(data), formats=PHOTO_FORMATS)
    width, height = image.size
    if width * height > max_pixels:
        raise InputError(f"image too large: {width}x{height} pixels (limit {max_pixels})")
    if max_scans is not None and image.format in JPEG_FORMATS:
        scans = jpeg_scans(data)
        if scans > max_scans:
            raise InputError(f"a JPEG of {scans} scans; at most {max_scans} are decoded")
    return image


def decode_image(data: bytes, draft_size: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_scans: int | None = None) -> Image.Image:
    """Decode image bytes to an upright RGB picture, refusing bombs, broken files and formats
    other than PHOTO_FORMATS (see open_photo).

    With `draft_size`, JPEGs are decoded at the smallest DCT scale that still
    covers `draft_size` on the longer side, which is cheaper and feeds the same
    model input size.
    """
    return load_photo(open_photo(data, max_pixels, max_scans), data, draft_size)


def load_photo(image: Image.Image, data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode a photo that open_photo accepted (`data` its bytes, for the error message). With
    `draft_size`, a JPEG is decoded at a reduced DCT scale and any other photo is reduced right
    after decoding, both toward twice `draft_size`, so that a 50-megapixel photo's full-size
    buffer lives only until then (its conversions work on the reduced one)."""
    with _pillow_refusals(data):
        width, height = image.size
        if draft_size and image.format in JPEG_FORMATS:
            scale = draft_size / max(width, height)
            if scale < 1:
                image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
        image.load()
        if draft_size:
            image = reduce_toward(image, draft_size)
    return to_rgb(image, in_place=True)


REDUCIBLE_MODES = ("RGB", "RGBA", "L", "LA")


def reduce_toward(image: Image.Image, size: int) -> Image.Image:
    """`image` box-reduced by a whole factor to no less than twice `size` on its longer side
    (the final resize then has pixels enough to work with); unchanged when that factor is 1."""
    factor = max(image.size) // (2 * size)
    return image.reduce(factor) if factor >= 2 and image.mode in REDUCIBLE_MODES else image


@contextmanager
def _pillow_refusals(data: bytes):
    """Pillow's failures while reading `data` (bomb warnings included) as InputErrors naming
    what arrived. Nothing inside may raise an InputError of its own: it is a ValueError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError("image too large: over the decompression-bomb limit") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"not a readable image: {_unreadable_reason(data, error)}") from error


# Other files people send instead of a photo, named in the refusal: (signature, offset, what).
_NOT_PHOTOS = (
    (b"%PDF", 0, "a PDF document"), (b"PK\x03\x04", 0, "a ZIP archive"), (b"<svg", 0, "an SVG drawing"),
    (b"<?xml", 0, "an XML document"), (b"8BPS", 0, "a Photoshop (PSD) file"),
    (b"%!PS", 0, "a PostScript (EPS) file"), (b"\xc5\xd0\xd3\xc6", 0, "a PostScript (EPS) file"),
    (b"\x00\x00\x01\x00", 0, "a Windows icon (ICO)"), (b"\x00\x00\x02\x00", 0, "a Windows cursor (CUR)"),
    (b"II*\x00", 0, "a TIFF image"), (b"MM\x00*", 0, "a TIFF image"), (b"BM", 0, "a BMP image"),
    (b"\x01\xda", 0, "an SGI image"), (b"Image type:", 0, "an IM image"), (b"qoif", 0, "a QOI image"),
    (b"DDS ", 0, "a DDS texture"), (b"icns", 0, "an Apple icon (ICNS)"),
    (b"\x00\x00\x00\x0cjP  ", 0, "a JPEG 2000 image"), (b"\xff\x4f\xff\x51", 0, "a JPEG 2000 image"),
    (b"ftypavif", 4, "an AVIF image"), (b"ftypheic", 4, "a HEIC image"), (b"ftypheix", 4, "a HEIC image"),
    (b"ftypmif1", 4, "a HEIF image"),
)
_NETPBM = re.compile(rb"P[1-7]\s")
_PCX = re.compile(rb"\x0a[\x00-\x05][\x00\x01]")
_TGA_FOOTER = b"TRUEVISION-XFILE.\x00"


def _not_a_photo(data: bytes) -> str | None:
    """What a file that is not one of PHOTO_FORMATS is, when its bytes say so."""
    if data.endswith(_TGA_FOOTER):  # before the signatures: a TGA may begin like a cursor
        return "a TGA image"
    raw = data[:256]
    starts = (raw, raw.lstrip().lower())  # text formats may begin with blanks, in any case
    for signature, offset, what in _NOT_PHOTOS:
        if any(start[offset:].startswith(signature) for start in starts):
            return what
    if _PCX.match(raw):
        return "a PCX image"
    if _NETPBM.match(raw):
        return "a Netpbm (PPM/PGM/PBM) image"
    return None


_PIL_DETAIL = re.compile(r"<[^>]*\bat 0x[0-9a-fA-F]+>|'[^']*'")


def _unreadable_reason(data: bytes, error: Exception) -> str:
    """Why decoding failed, in words that quote neither the request nor PIL's internals."""
    what = _not_a_photo(data)
    if what:
        return f"{what}, not a photo; send {PHOTO_FORMAT_NAMES}"
    if isinstance(error, Image.UnidentifiedImageError):
        return f"unrecognised image format; send {PHOTO_FORMAT_NAMES}"
    detail = _PIL_DETAIL.sub("", str(error)).strip(" :")
    return quote(detail or type(error).__name__, 80).strip("'")


def to_rgb(image: Image.Image, in_place: bool = False) -> Image.Image:
    """Apply EXIF orientation and convert any mode to RGB (transparency onto the pad colour).
    `in_place`: `image` is the caller's to change, so no copy of it is made."""
    if in_place:
        ImageOps.exif_transpose(image, in_place=True)
    else:
        image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", image.size, PAD_COLOUR)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_to_square(image: Image.Image, size: int) -> Image.Image:
    """Scale so the longer side is `size`, keep the aspect ratio, pad to a centred square."""
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BILINEAR, reducing_gap=None)
    if new_size == (size, size):
        return image
    square = Image.new("RGB", (size, size), PAD_COLOUR)
    square.paste(image, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return square


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB picture -> uint8 tensor [3, H, W]; normalisation lives inside the model."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def model_image(image: Image.Image, size: int) -> torch.Tensor:
    """What every image model sees: RGB, fitted into a padded square, uint8 [3, size, size]."""
    return image_to_tensor(fit_to_square(to_rgb(image), size))


def model_image_from_bytes(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                           max_scans: int | None = None) -> torch.Tensor:
    return image_to_tensor(fit_to_square(decode_image(data, size, max_pixels, max_scans), size))


# ---------------------------------------------------------------- text
def strip_name_boilerplate(name: str) -> str:
    """Remove the site's ` | in <town> | Gumtree` suffix."""
    return _NAME_SUFFIX.sub("", name).strip()


def strip_description_boilerplate(description: str) -> str:
    """Remove `Posted by <user> in <sub-categories> in <town>.` sentences (they name the label)."""
    return _SPACES.sub(" ", _POSTED_BY.sub(" ", description)).strip()


def normalise_whitespace(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def listing_text(name: str | None, description: str | None) -> str:
    """Name first, so truncation keeps it; boilerplate and control characters removed.
    Each field is cut to MAX_FIELD_CHARS first, in training and serving alike."""
    name = strip_name_boilerplate(normalise_whitespace((name or "")[:MAX_FIELD_CHARS]))
    description = strip_description_boilerplate((description or "")[:MAX_FIELD_CHARS])
    text = " ".join(part for part in (name, description) if part)
    return "".join(character for character in text if character.isprintable())


def free_text(text: str) -> str:
    """A listing sent as one text: the same cleaning as name + description."""
    return listing_text(None, strip_name_boilerplate(normalise_whitespace(text[:MAX_FIELD_CHARS])))


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded only to the longest text of the batch."""
    encoded = tokenizer(list(texts), padding="longest", truncation=True,
                        max_length=max_length, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


# ---------------------------------------------------------------- outputs
def pool_photos(logits: torch.Tensor, listing_of_photo: torch.Tensor, listings: int) -> torch.Tensor:
    """One row of log-probabilities per listing: the mean over its photos of log_softmax(logits)
    (chosen on validation over averaging probabilities; docs/results.md). A listing with one
    photo, or a text-only answer, keeps log_softmax(logits)."""
    log_probabilities = torch.log_softmax(logits.float(), dim=1)
    sums = torch.zeros(listings, logits.shape[1], dtype=torch.float32, device=logits.device)
    sums.index_add_(0, listing_of_photo.to(logits.device), log_probabilities)
    counts = torch.bincount(listing_of_photo.to(logits.device), minlength=listings).clamp(min=1)
    return sums / counts[:, None]


def listing_probabilities(pooled: torch.Tensor, temperature: float) -> torch.Tensor:
    """The answer: softmax of the pooled log-probabilities over the temperature fitted on the
    validation listings."""
    return torch.softmax(pooled / temperature, dim=1)


def needs_review(probability: float, threshold: float | None) -> bool:
    """A listing is filed automatically only when its answer is at least this sure; without a
    threshold (none reached the target precision on validation) every answer is reviewed."""
    return threshold is None or probability < threshold


def describe_probabilities(probabilities: Iterable[float], index_to_name: dict[str, str],
                           top_k: int = 3) -> dict:
    """One response: best category, its probability, the top k and all probabilities."""
    values = [float(p) for p in probabilities]
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=True)
    top_k = max(1, min(int(top_k), len(values)))
    best = order[0]
    return {
        "category": index_to_name[str(best)],
        "probability": values[best],
        "top_k": [{"category": index_to_name[str(i)], "probability": values[i]}
                  for i in order[:top_k]],
        "probabilities": {index_to_name[str(i)]: values[i] for i in range(len(values))},
    }


# ---------------------------------------------------------------- lexical features
_WORDS = re.compile(r"\w+")
CHAR_NGRAMS = (2, 5)


def lexical_terms(text: str, settings: LexicalSettings) -> list[str]:
    """Word 1-2-grams and character 2-5-grams of each word (with its boundaries), lower case:
    what carries brand and model names ("ps4", "kallax") that a sentence encoder blurs. The
    first `settings.head_words` words (the listing's name comes first) also count as their own
    terms, apart from the same words further down the description."""
    return [term for term, _ in labelled_lexical_terms(text, settings)]


def labelled_lexical_terms(text: str, settings: LexicalSettings) -> list[tuple[str, str]]:
    """`lexical_terms`, each with what a reader would call it: its word (for the word itself,
    its character n-grams and its name copy) or its two words (for a word pair)."""
    words = _WORDS.findall(text[:settings.max_chars].lower())
    head_words = settings.head_words
    head = [("n" + term, label) for term, label in _word_terms(words[:head_words])] if head_words > 0 else []
    return _word_terms(words) + head


def _word_terms(words: list[str]) -> list[tuple[str, str]]:
    terms = [("w " + word, word) for word in words]
    terms += [("b " + first + " " + second, first + " " + second)
              for first, second in zip(words, words[1:], strict=False)]
    low, high = CHAR_NGRAMS
    for word in words:
        padded = f" {word} "
        terms += [("c " + padded[start:start + size], word) for size in range(low, high + 1)
                  for start in range(len(padded) - size + 1)]
    return terms


def lexical_bucket(term: str, settings: LexicalSettings) -> int:
    """The hashed id of a term (1..buckets-1; 0 pads)."""
    return zlib.crc32(term.encode("utf-8")) % (settings.buckets - 1) + 1


def lexical_ids(text: str, settings: LexicalSettings) -> tuple[list[int], list[float]]:
    """Hashed term ids (1..buckets-1; 0 pads) and how often each occurs in the text."""
    counts: dict[int, int] = {}
    for term in lexical_terms(text, settings):
        bucket = lexical_bucket(term, settings)
        counts[bucket] = counts.get(bucket, 0) + 1
    ids = sorted(counts)
    return ids, [float(counts[i]) for i in ids]


def lexical_batch(texts: Sequence[str], settings: LexicalSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Term ids [B, L] and counts [B, L] of a batch, padded with id 0 to its longest text."""
    return pad_lexical([lexical_ids(text, settings) for text in texts])


def pad_lexical(pairs: Sequence[tuple[list[int], list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, counts) per text -> ids [B, L] and counts [B, L], padded with id 0."""
    width = max(1, max(len(ids) for ids, _ in pairs))
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    counts = torch.zeros(len(pairs), width)
    for row, (row_ids, row_counts) in enumerate(pairs):
        ids[row, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        counts[row, :len(row_counts)] = torch.tensor(row_counts)
    return ids, counts


# ---------------------------------------------------------------- the model-input contract


def text_inputs(tokenizer, texts: Sequence[str], settings: TextSettings) -> list[torch.Tensor]:
    """Token ids and mask, then (when the model has a lexical branch) term ids and counts."""
    inputs = list(tokenize(tokenizer, texts, settings.max_length))
    if settings.lexical:
        inputs += lexical_batch(texts, settings.lexical)
    return inputs


def model_inputs(kind: str | ModelKind, images: Sequence[torch.Tensor] | None, texts: Sequence[str] | None,
                 tokenizer=None, text_settings: TextSettings | None = None) -> tuple[torch.Tensor, ...]:
    """What every model of `kind` is called with, in order (ModelKind.script_inputs): uint8 images
    [B,3,H,W], then the text inputs. Training, export, the serving core, the benchmark and the
    tests all use this."""
    kind = model_kind(kind)
    inputs: list[torch.Tensor] = []
    if kind.uses_image:
        inputs.append(torch.stack(list(images)))
    if kind.uses_text:
        inputs += text_inputs(tokenizer, list(texts), text_settings)
    return tuple(inputs)
