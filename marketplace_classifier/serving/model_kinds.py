"""The model kinds, each one object that says what it needs and how it is called (no torch here:
the CLI, the archiver and the engines import it)."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_INPUTS = ("images",)  # uint8 [B, 3, H, W], one row per photo
TEXT_INPUTS = ("input_ids", "attention_mask")
LEXICAL_INPUTS = ("lexical_ids", "lexical_counts")  # when the text model has its lexical branch


@dataclass(frozen=True)
class ModelKind:
    """One model kind: `needs` what a listing must give it; `frozen_entry` the model's method that
    frozen training calls on cached encoder outputs (it answers each branch's logits);
    `extra_methods` what its TorchScript holds beside forward."""

    name: str
    needs: frozenset[str]
    frozen_entry: str
    extra_methods: tuple[str, ...] = ()

    @property
    def uses_image(self) -> bool:
        return "image" in self.needs

    @property
    def uses_text(self) -> bool:
        return "text" in self.needs

    @property
    def fuses(self) -> bool:
        """Both an image and a text branch inside (image_model, text_model)."""
        return self.uses_image and self.uses_text

    @property
    def answers_text_only(self) -> bool:
        """Its TorchScript has text_only, for listings sent without a photo."""
        return "text_only" in self.extra_methods

    @property
    def text_once_per_listing(self) -> bool:
        """Its TorchScript has listings: photos beside one text row per listing (older exports
        of a fused model do not, and run the text once per photo)."""
        return "listings" in self.extra_methods

    @property
    def per_photo(self) -> bool:
        """A training sample is a photo (with its listing's text), not a listing's text alone."""
        return self.uses_image

    def script_inputs(self, lexical: bool) -> tuple[str, ...]:
        """What its TorchScript forward is called with, in order (serving.processing.model_inputs)."""
        text = TEXT_INPUTS + (LEXICAL_INPUTS if lexical else ())
        return (IMAGE_INPUTS if self.uses_image else ()) + (text if self.uses_text else ())

    def image_part(self, model):
        """The image classifier inside `model` (itself, or a fused model's branch); None without."""
        if not self.uses_image:
            return None
        return model.image_model if self.fuses else model

    def text_part(self, model):
        """The text classifier inside `model` (itself, or a fused model's branch); None without."""
        if not self.uses_text:
            return None
        return model.text_model if self.fuses else model

    def __str__(self) -> str:
        return self.name


IMAGE = ModelKind("image", frozenset({"image"}), frozen_entry="feature_branches")
TEXT = ModelKind("text", frozenset({"text"}), frozen_entry="branch_logits")
COMBINED = ModelKind("combined", frozenset({"image", "text"}), frozen_entry="fused_branches",
                     extra_methods=("text_only", "listings"))
KINDS = {kind.name: kind for kind in (IMAGE, TEXT, COMBINED)}
MODEL_KINDS = tuple(KINDS)


def model_kind(name: str | ModelKind) -> ModelKind:
    """The kind called `name`, or ValueError naming the kinds. `text_int8` and `combined_int8`
    (the text encoder quantised, `marketplace-classifier export --int8`) are of their model's kind."""
    if isinstance(name, ModelKind):
        return name
    base = str(name).removesuffix("_int8")
    kind = KINDS.get(base)
    if kind is None or (base != name and not kind.uses_text):
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_KINDS)}, "
                         "text_int8 or combined_int8")
    return kind
