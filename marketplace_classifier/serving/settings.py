"""What a model needs before and after it runs: written once at export as preprocessing.json,
read back by the serving core, the benchmark and the tests. One frozen object, one file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from marketplace_classifier.serving.files import atomic_write
from marketplace_classifier.serving.layout import (
    CARD_FILE,
    LABELS_FILE,
    REFERENCE_FILE,
    SETTINGS_FILE,
    TOKENIZER_FOLDER,
)
from marketplace_classifier.serving.model_kinds import KINDS

__all__ = ["CARD_FILE", "LABELS_FILE", "REFERENCE_FILE", "SETTINGS_FILE"]  # also read from here

PAD_COLOUR = (0, 0, 0)
TORCHSCRIPT, ONNXRUNTIME, OPENVINO = "torchscript", "onnxruntime", "openvino"
RUNTIMES = (TORCHSCRIPT, ONNXRUNTIME, OPENVINO)  # marketplace_classifier/serving/runtimes.py runs them
# Written for a person reading the file; what the code does is fixed by
# marketplace_classifier/serving/processing.py.
NOTES = {
    "image": "uint8 [B,3,size,size] RGB: EXIF orientation applied, longer side fitted to size, "
             "padded to a centred square with pad_colour; mean/std are applied inside the model",
    "text": "product_name then product_description, joined by a space, Gumtree boilerplate "
            "stripped, each field cut to 10,000 characters; token ids padded to the longest in "
            "the batch; lexical: hashed word 1-2-grams and character 2-5-grams",
    "answer": "softmax(mean over the listing's photos of log_softmax(logits), / temperature); "
              "needs_review when its probability is below review_threshold",
}

# Descriptions that exports before ModelSettings wrote inline; read and ignored.
EARLIER_NOTES = {"image": {"resize", "dtype", "layout", "normalisation"},
                 "text": {"padding", "fields", "joiner", "strip_boilerplate"}}


class SettingsError(ValueError):
    """A preprocessing.json that this code cannot serve."""


@dataclass(frozen=True)
class LexicalSettings:
    buckets: int
    max_chars: int
    head_words: int = 0  # the first words (the name) also hashed as terms of their own


@dataclass(frozen=True)
class TextSettings:
    max_length: int
    lexical: LexicalSettings | None = None
    encoder: str = "minilm"
    tokenizer: str = TOKENIZER_FOLDER  # folder beside the model


@dataclass(frozen=True)
class ImageSettings:
    size: int
    mean: tuple[float, ...]  # applied inside the model; recorded for other runtimes
    std: tuple[float, ...]
    pad_colour: tuple[int, ...] = PAD_COLOUR

    def __post_init__(self) -> None:
        if tuple(self.pad_colour) != PAD_COLOUR:  # the cleaned training photos were padded so
            raise SettingsError(f"pad_colour {list(self.pad_colour)}: this code pads with {list(PAD_COLOUR)}")


def runtime_label(runtime: str, int8: bool = False, bf16: bool = False) -> str:
    """A runtime with its precision variant: e.g. `openvino bf16`, `onnxruntime int8`."""
    return runtime + (" int8" if int8 else " bf16" if bf16 else "")


@dataclass(frozen=True)
class ModelSettings:
    model: str
    num_classes: int
    image: ImageSettings | None = None
    text: TextSettings | None = None
    temperature: float = 1.0  # fitted on the validation listings: softmax(pooled / temperature)
    int8_text_encoder: bool = False
    text_only_temperature: float | None = None  # combined: listings without a photo
    review_threshold: float | None = None  # filed automatically at or above; None: always review
    target_precision: float = 0.95  # what review_threshold was chosen for, on validation
    runtime: str = TORCHSCRIPT  # what the serving core runs: model.pt, or onnx/ under a runtime
    onnx_int8: bool = False  # the ONNX programs with int8 matmuls (onnx/<method>.int8.onnx)
    onnx_bf16: bool = False  # OpenVINO computes in bfloat16 where the CPU has bf16 units, else float32
    runtime_choice: dict | None = None  # how export chose: items/s per runtime, the precision gates
    files: dict[str, str] | None = None  # SHA-256 of every other file of the export, by relative path
    # the categories below the roots and how to decode and stop (serving/taxonomy.py); None: roots only
    taxonomy: dict | None = None

    def __post_init__(self) -> None:
        if self.model not in KINDS:
            raise SettingsError(f"unknown model {self.model!r}; expected one of {', '.join(KINDS)}")
        for part in ("image", "text"):
            needed = part in KINDS[self.model].needs
            if needed != (getattr(self, part) is not None):
                raise SettingsError(f"a {self.model} model {'needs' if needed else 'has no'} {part} settings")
        for name in ("temperature", "text_only_temperature"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise SettingsError(f"{name} must be positive, not {value}")
        if self.runtime not in RUNTIMES:
            raise SettingsError(f"unknown runtime {self.runtime!r}; expected one of {', '.join(RUNTIMES)}")
        if self.onnx_int8 and self.runtime == TORCHSCRIPT:
            raise SettingsError("onnx_int8 needs an ONNX runtime, not torchscript")
        if self.onnx_bf16 and self.runtime != OPENVINO:
            raise SettingsError(f"onnx_bf16 is OpenVINO's precision hint, not {self.runtime}'s")
        if self.review_threshold is not None and not 0 <= self.review_threshold <= 1:
            raise SettingsError(f"review_threshold must be in [0, 1], not {self.review_threshold}")

    @property
    def runtime_label(self) -> str:
        return runtime_label(self.runtime, self.onnx_int8, self.onnx_bf16)

    @property
    def inputs(self) -> list[str]:
        """The model's positional inputs, in order (serving.processing.model_inputs)."""
        return list(KINDS[self.model].script_inputs(lexical=bool(self.text and self.text.lexical)))

    def to_json(self) -> dict:
        return asdict(self) | {"inputs": self.inputs, "notes": NOTES}

    def save(self, folder: Path) -> Path:
        text = json.dumps(self.to_json(), indent=2) + "\n"
        return atomic_write(Path(folder) / SETTINGS_FILE, lambda temporary: temporary.write_text(text))

    @classmethod
    def load(cls, folder: Path) -> ModelSettings:
        path = Path(folder) / SETTINGS_FILE
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError, KeyError, SettingsError) as error:
            raise SettingsError(f"{path}: {error}") from error

    @classmethod
    def from_json(cls, data: dict) -> ModelSettings:
        data = {key: value for key, value in data.items() if key not in ("inputs", "notes")}
        _check_keys(cls, data, "")
        image, text = (_without_notes(data.pop(part, None), part) for part in ("image", "text"))
        if image is not None:
            _check_keys(ImageSettings, image, "image.")
            image = ImageSettings(**{key: tuple(value) if isinstance(value, list) else value
                                     for key, value in image.items()})
        if text is not None:
            _check_keys(TextSettings, text, "text.")
            lexical = text.get("lexical")
            if lexical is not None:
                _check_keys(LexicalSettings, lexical, "text.lexical.")
            text = TextSettings(**(text | {"lexical": LexicalSettings(**lexical) if lexical else None}))
        return cls(**data, image=image, text=text)


def _without_notes(part: dict | None, name: str) -> dict | None:
    return None if part is None else {k: v for k, v in part.items() if k not in EARLIER_NOTES[name]}


def _check_keys(kind: type, data: dict, prefix: str) -> None:
    known = {field.name for field in fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"unknown setting {prefix}{unknown[0]} "
                            f"(this code knows {', '.join(sorted(known))})")


def write_index_to_name(mapping: dict[str, str], path: Path) -> None:
    text = json.dumps(mapping, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def read_index_to_name(path: Path, num_classes: int | None = None) -> dict[str, str]:
    """The label decoder: class names keyed by their index as a string, 0..n-1 (n = num_classes
    when given)."""
    mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    count = len(mapping) if num_classes is None else num_classes
    if sorted(mapping, key=str) != sorted(str(i) for i in range(count)):
        raise ValueError(f"{path}: keys must be the indices 0..{count - 1}")
    return mapping


def write_card(card: dict, folder: Path) -> Path:
    text = json.dumps(card, indent=2) + "\n"
    return atomic_write(Path(folder) / CARD_FILE, lambda temporary: temporary.write_text(text))


def read_card(folder: Path) -> dict | None:
    """The model card beside an exported model, None for exports made before cards."""
    path = Path(folder) / CARD_FILE
    return json.loads(path.read_text()) if path.exists() else None
