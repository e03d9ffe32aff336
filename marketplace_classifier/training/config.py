"""Training settings, importable without torch: one frozen configuration, validated when built,
whose fields carry their own help (the CLI's `train` options are generated from them)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

from marketplace_classifier.serving.model_kinds import MODEL_KINDS, ModelKind, model_kind

FINETUNE = ("none", "last", "all")
BN_STATS = ("frozen", "update")
DECAY = ("none", "cosine")


# The configuration's sections, in the order `train --help` and the model card list them.
SECTIONS = {
    "model": "what is trained, from which data",
    "paths": "where checkpoints, logs and cached features go",
    "optimisation": "optimiser, schedule and stopping",
    "image": "the image branch",
    "text": "the text branch",
    "combined": "the combined model's branches",
    "hardware": "devices and data loading",
}


def option(section: str, default: Any, help: str, cli: bool = True) -> Any:
    """A field with its section and help; `cli` False: not a `train` option (set by the code)."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}")
    factory = {"default_factory": dict} if default == {} else {"default": default}
    return field(**factory, metadata={"help": help, "cli": cli, "section": section})


_model, _paths, _optimisation, _image, _text, _combined, _hardware = (partial(option, name)
                                                                      for name in SECTIONS)


@dataclass(frozen=True)
class TrainConfig:
    model: str = _model("image", "image, text or combined", cli=False)
    data_dir: str = _model("data/clean", "cleaned and split folder", cli=False)
    seed: int = _model(0, "random seed (runs are deterministic on CPU)")
    reviewed_dir: str | None = _model(None, "a cleaned folder of reviewers' decisions (`review export`, then "
                                            "`clean`) added to the training split only")
    levels: int = _model(3, "levels of the category path the model answers (1: the 13 roots only)")
    min_listings: int = _model(5, "a category below the roots with fewer training listings folds into "
                                  "its parent")

    checkpoint_dir: str = _paths("checkpoints", "where checkpoints/<model>/best.pt goes")
    runs_dir: str = _paths("runs", "TensorBoard logs")
    cache_dir: str | None = _paths("cache/features", "where frozen features are cached")
    resume: bool = _paths(False, "continue after the last complete epoch (checkpoints/<model>/last.pt)",
                          cli=False)
    init_from: str | None = _paths(None, "start from this checkpoint's weights (same model), e.g. fine-tune "
                                         "from a frozen run")

    epochs: int = _optimisation(15, "passes over the training split")
    batch_size: int = _optimisation(64, "samples per step (under torchrun: the global batch, split over the "
                                        "processes)")
    lr: float = _optimisation(1e-3, "AdamW learning rate")
    weight_decay: float = _optimisation(1e-4, "AdamW weight decay")
    # pretrained weights move slowly; the new head learns at --lr
    backbone_lr: float = _optimisation(5e-5, "AdamW learning rate of a fine-tuned image backbone or text "
                                             "encoder")
    warmup_epochs: float = _optimisation(0.0, "linear learning-rate warmup, in epochs (fractions allowed)")
    decay: str = _optimisation("none", "learning-rate decay after warmup, per step: none or cosine (to zero "
                                       "at the last epoch)")
    grad_clip: float = _optimisation(0.0, "clip the gradient norm to this (0: off)")
    patience: int = _optimisation(0, "stop after this many epochs without a better validation accuracy (0: "
                                     "off)")

    image_backbone: str = _image("resnet50", "resnet50, efficientnet_lite0, efficientnet_lite1 or "
                                             "efficientnet_lite2")
    image_weights: str = _image("imagenet", "imagenet, none, or the path of a state dict")
    image_size: int = _image(224, "side of the square model input")
    finetune: str = _image("none", "image backbone: none (frozen, cached features), last (last stage) or all")
    bn_stats: str = _image("frozen", "fine-tuning: batch-norm running statistics 'frozen' as pretrained "
                                     "(default) or 'update'")
    cached_views: int = _image(2, "--finetune last (image model): views of each training photo whose "
                                  "activations below the last stage are cached (1: the photo, 2: and its "
                                  "mirror, more: random crops too)")

    text_encoder: str = _text("minilm", "minilm (shipped), a model folder, or a name in the local HF cache")
    max_length: int = _text(128, "tokens kept of name + description")
    finetune_encoder: bool = _text(False, "train the text encoder too", cli=False)
    lexical_buckets: int = _text(262_144, "hashed n-gram buckets of the text model's lexical branch (0: no "
                                          "lexical branch)")
    lexical_max_chars: int = _text(5_000, "characters of a listing's text the lexical branch reads",
                                   cli=False)
    lexical_head_words: int = _text(10, "the lexical branch also hashes the first N words (the name) apart "
                                        "(0: off)")
    lexical_levels_rank: int = _text(0, "the lexical branch also answers the levels below the roots, through "
                                        "a hashed bag of this width and a linear layer (0: roots only)")
    lexical_levels_buckets: int = _text(32_768, "the lexical branch also answers the levels below the roots, "
                                                "from a full table of this many buckets, the terms folded "
                                                "into it (0: roots only)")
    # the lexical branch starts at zero and its inputs are L2-normalised: it learns faster than the rest
    lexical_lr: float = _text(2e-2, "AdamW learning rate of the lexical branch")

    image_checkpoint: str | None = _combined(None, "combined: the image branch's checkpoint (default: "
                                                   "<checkpoint-dir>/image/best.pt)")
    text_checkpoint: str | None = _combined(None, "combined: the text branch's checkpoint (default: "
                                                  "<checkpoint-dir>/text/best.pt)")
    branches: dict = _combined({}, "combined: the image and text configs it was built from", cli=False)

    device: str = _hardware("auto", "auto, cpu, cuda or cuda:N")
    feature_batch_size: int = _hardware(32, "batch size when computing frozen features")
    num_workers: int = _hardware(0, "data loader processes when fine-tuning")

    def __post_init__(self) -> None:
        for problem in self.problems():
            raise ValueError(problem)

    def problems(self) -> list[str]:
        """What is wrong with these settings, each named as its CLI option."""
        found = []
        if self.model not in MODEL_KINDS:
            found.append(f"--model {self.model!r}: choose {', '.join(MODEL_KINDS)}")
        for name, choices in (("finetune", FINETUNE), ("bn_stats", BN_STATS), ("decay", DECAY)):
            if getattr(self, name) not in choices:
                value = getattr(self, name)
                found.append(f"--{name.replace('_', '-')} {value!r}: choose {' or '.join(choices)}")
        for name, least in (("epochs", 1), ("batch_size", 1), ("image_size", 16), ("cached_views", 1),
                            ("max_length", 1), ("feature_batch_size", 1), ("lexical_max_chars", 1),
                            ("levels", 1), ("min_listings", 1), ("patience", 0), ("lexical_buckets", 0),
                            ("lexical_head_words", 0), ("lexical_levels_rank", 0),
                            ("lexical_levels_buckets", 0),
                            ("num_workers", 0), ("weight_decay", 0), ("warmup_epochs", 0), ("grad_clip", 0),
                            ("lr", 0), ("lexical_lr", 0), ("backbone_lr", 0)):
            if getattr(self, name) < least:
                found.append(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least {least}")
        if self.lexical_levels_rank and self.lexical_levels_buckets:
            found.append("--lexical-levels-rank and --lexical-levels-buckets: choose one way for the "
                         "lexical branch's levels (a rank needs --lexical-levels-buckets 0)")
        return found

    @property
    def kind(self) -> ModelKind:
        return model_kind(self.model)

    @property
    def frozen(self) -> bool:
        return self.finetune == "none" and not self.finetune_encoder


def train_options() -> dict[str, tuple[str, str]]:
    """The `train` command's options: every field the CLI sets, with its section and help."""
    return {item.name: (item.metadata["section"], item.metadata["help"])
            for item in fields(TrainConfig) if item.metadata["cli"]}


def sectioned(config: TrainConfig) -> dict[str, dict[str, Any]]:
    """The configuration grouped by section (the model card's and `train --help`'s order)."""
    grouped: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for item in fields(config):
        grouped[item.metadata["section"]][item.name] = getattr(config, item.name)
    return grouped
