"""The listing API's two types, as the client sends and reads them: a Listing to classify and
the Classification that answers it. The OpenAPI document (client/openapi.py) is generated from
these dataclasses, so the client and the published description cannot drift apart."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

Photo = bytes | str | Path  # the bytes of a photo, or a path to read them from


@dataclass(frozen=True)
class Listing:
    """A listing to classify: its text (or its name and description) and/or its photos."""

    text: str | None = field(default=None, metadata={"doc": "name and description as one text"})
    product_name: str | None = field(default=None, metadata={"doc": "the listing's title"})
    product_description: str | None = field(default=None, metadata={"doc": "the listing's description"})
    images: tuple[bytes, ...] = field(
        default=(),
        metadata={
            "doc": "the listing's photos (JPEG, PNG, GIF, WebP, BMP or TIFF), base64 in JSON; at most 10",
            "format": "byte",
        },
    )
    top_k: int | None = field(
        default=None, metadata={"doc": "how many root categories to list (default 3)", "minimum": 1}
    )
    min_confidence: float | None = field(
        default=None,
        metadata={
            "doc": "file automatically at or above this probability (default: the threshold chosen "
            "at export)",
            "minimum": 0,
            "maximum": 1,
        },
    )

    explain: bool | None = field(
        default=None,
        metadata={"doc": "add why the model answered what it did (costs more of the work budget)"},
    )

    def __post_init__(self) -> None:
        if self.text is not None and (self.product_name is not None or self.product_description is not None):
            raise ValueError("give the text either as `text` or as `product_name`/`product_description`")
        if self.is_empty:
            raise ValueError("a listing needs text, a name, a description or at least one photo")

    @classmethod
    def of(
        cls,
        text: str | None = None,
        photos: list[Photo] | tuple[Photo, ...] = (),
        *,
        name: str | None = None,
        description: str | None = None,
        top_k: int | None = None,
        min_confidence: float | None = None,
        explain: bool | None = None,
    ) -> Listing:
        """A listing from text and photo bytes or paths (paths are read here)."""
        return cls(
            text, name, description, tuple(read_photo(photo) for photo in photos), top_k, min_confidence,
            explain,
        )

    @property
    def is_empty(self) -> bool:
        texts = (self.text, self.product_name, self.product_description)
        return not self.images and not any((value or "").strip() for value in texts)

    def to_json(self) -> dict:
        """The listing as one instance of the API's JSON body."""
        body: dict = {
            name: value
            for name, value in (
                ("text", self.text),
                ("product_name", self.product_name),
                ("product_description", self.product_description),
                ("top_k", self.top_k),
                ("min_confidence", self.min_confidence),
                ("explain", self.explain),
            )
            if value is not None
        }
        if self.images:
            body["images"] = [base64.b64encode(photo).decode("ascii") for photo in self.images]
        return body

    def json_size(self) -> int:
        """About the bytes this listing adds to a JSON body (base64 is 4/3 of its photos)."""
        return (
            sum(len(photo) * 4 // 3 + 4 for photo in self.images)
            + sum(len(value or "") * 2 for value in (self.text, self.product_name, self.product_description))
            + 64
        )


def read_photo(photo: Photo) -> bytes:
    if isinstance(photo, (bytes, bytearray)):
        return bytes(photo)
    return Path(photo).read_bytes()


@dataclass(frozen=True)
class Level:
    """One level of the category path: its name and probability."""

    name: str
    probability: float


@dataclass(frozen=True)
class Choice:
    """One of the top root categories."""

    category: str
    probability: float


@dataclass(frozen=True)
class Term:
    """A word (with its character n-grams) or a word pair, and its exact part of the lexical
    branch's logit of the answer."""

    term: str
    contribution: float


@dataclass(frozen=True)
class LexicalExplanation:
    """The lexical branch's logit of the answer: bias + the terms' contributions + other_terms."""

    method: str
    logit: float
    bias: float
    other_terms: float = field(metadata={"doc": "the contributions of the terms not listed, summed"})
    terms: tuple[Term, ...] = field(metadata={"doc": "the terms for the answer (first) and against it"})


@dataclass(frozen=True)
class Word:
    """A word of the text (at character `start`) and the drop in the encoder branch's log-odds
    of the answer without it."""

    word: str
    start: int
    contribution: float


@dataclass(frozen=True)
class EncoderExplanation:
    method: str
    words: tuple[Word, ...]


@dataclass(frozen=True)
class TextExplanation:
    lexical: LexicalExplanation | None = None
    encoder: EncoderExplanation | None = None


@dataclass(frozen=True)
class BranchShare:
    """A branch's share of the answer's margin over the runner-up (negative: it argued against)."""

    branch: str
    share: float
    contribution: float = field(default=0.0, metadata={"doc": "its part of the margin, in log-probability"})


@dataclass(frozen=True)
class PhotoExplanation:
    """A photo's grid: each cell's drop in the answer's log-odds when the cell is occluded."""

    method: str
    grid: int
    cells: tuple[tuple[float, ...], ...]
    milliseconds: float
    photo: int = field(default=1, metadata={"doc": "which photo of the listing, as sent (1: the first)"})


@dataclass(frozen=True)
class Explanation:
    """Why the model answered its root category (sent when the listing asked with `explain`)."""

    category: str | None = None
    level: str | None = None
    text: TextExplanation | None = None
    branches: tuple[BranchShare, ...] = ()
    photos: tuple[PhotoExplanation, ...] = ()
    error: str | None = field(default=None, metadata={"doc": "why no explanation could be made"})

    @classmethod
    def from_json(cls, body: dict) -> Explanation:
        return from_json(cls, body)


def from_json(cls, value):
    """A JSON value as the type `cls` (a dataclass, a tuple of them, a number ...), by its hints."""
    import dataclasses
    import types
    import typing

    origin, arguments = typing.get_origin(cls), typing.get_args(cls)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        return from_json(next(argument for argument in arguments if argument is not type(None)), value)
    if origin is tuple:
        return tuple(from_json(arguments[0], item) for item in value)
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return cls(**{item.name: from_json(hints[item.name], value[item.name])
                      for item in dataclasses.fields(cls) if item.name in value})
    return cls(value)


@dataclass(frozen=True)
class Classification:
    """The answer to one listing. `path` goes from the root down to the deepest level the model
    answers; the first `confident_depth` levels are confident enough to file automatically;
    `needs_review` when even the root is not."""

    category: str = field(metadata={"doc": "the root category"})
    probability: float = field(metadata={"doc": "the root category's calibrated probability"})
    needs_review: bool = field(metadata={"doc": "the root's probability is below the review threshold"})
    top_k: tuple[Choice, ...] = field(metadata={"doc": "the most probable root categories, best first"})
    # servers before the category path sent neither: read as a one-level path
    path: tuple[Level, ...] = field(
        default=(),
        metadata={
            "doc": "root, sub-category, leaf: the decoded path with each level's probability",
            "always_sent": True,
        },
    )
    confident_depth: int = field(
        default=1,
        metadata={
            "doc": "how many levels of `path` are confident (0: none, the listing needs review)",
            "always_sent": True,
            "minimum": 0,
        },
    )
    model_version: str | None = field(
        default=None, metadata={"doc": "the version of the model that answered"}
    )
    photos: int | None = field(
        default=None, metadata={"doc": "photos the answer was made from (photo models)"}
    )
    answered_from: str | None = field(
        default=None, metadata={"doc": "'text only' when a photo model answered a listing without photos"}
    )
    probabilities: dict[str, float] = field(
        default_factory=dict, metadata={"doc": "every root category's calibrated probability"}
    )
    explanation: Explanation | None = field(
        default=None, metadata={"doc": "why the model answered its root (when the listing asked)"}
    )

    @classmethod
    def from_json(cls, body: dict) -> Classification:
        """An answer as the server sends it (older root-only servers: a one-level path)."""
        path = tuple(
            Level(str(level["name"]), float(level["probability"])) for level in body.get("path") or ()
        )
        if not path:
            path = (Level(str(body["category"]), float(body["probability"])),)
        return cls(
            str(body["category"]),
            float(body["probability"]),
            bool(body["needs_review"]),
            tuple(
                Choice(str(choice["category"]), float(choice["probability"]))
                for choice in body.get("top_k") or ()
            ),
            path,
            int(body.get("confident_depth", 0 if body["needs_review"] else 1)),
            body.get("model_version"),
            body.get("photos"),
            body.get("answered_from"),
            {str(name): float(value) for name, value in (body.get("probabilities") or {}).items()},
            Explanation.from_json(body["explanation"]) if body.get("explanation") else None,
        )

    @property
    def path_names(self) -> list[str]:
        return [level.name for level in self.path]

    @property
    def confident_path(self) -> list[str]:
        return self.path_names[: self.confident_depth]
