"""Training settings, importable without torch: one frozen configuration, validated when built,
whose fields carry their own help (the CLI's `train` options are generated from them)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from marketplace_classifier.serving.model_kinds import MODEL_KINDS, ModelKind, model_kind

FINETUNE = ("none", "last", "all")
BN_STATS = ("frozen", "update")
DECAY = ("none", "cosine")


def option(default: Any, help: str, cli: bool = True) -> Any:
    """A field with its help text; `cli` False: not a `train` option (set by the code)."""
    factory = {"default_factory": dict} if default == {} else {"default": default}
    return field(**factory, metadata={"help": help, "cli": cli})


@dataclass(frozen=True)
class TrainConfig:
    model: str = option("image", "image, text or combined", cli=False)
    data_dir: str = option("data/clean", "cleaned and split folder", cli=False)
    checkpoint_dir: str = option("checkpoints", "where checkpoints/<model>/best.pt goes")
    runs_dir: str = option("runs", "TensorBoard logs")
    cache_dir: str | None = option("cache/features", "where frozen features are cached")
    epochs: int = option(15, "passes over the training split")
    batch_size: int = option(64, "samples per step (under torchrun: the global batch, split over the "
                                 "processes)")
    lr: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    patience: int = option(0, "stop after this many epochs without a better validation accuracy (0: off)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    seed: int = option(0, "random seed (runs are deterministic on CPU)")
    image_backbone: str = option("resnet50", "resnet50, efficientnet_lite0, efficientnet_lite1 or "
                                             "efficientnet_lite2")
    image_weights: str = option("imagenet", "imagenet, none, or the path of a state dict")
    image_size: int = option(224, "side of the square model input")
    finetune: str = option("none", "image backbone: none (frozen, cached features), last (last stage) or all")
    bn_stats: str = option("frozen", "fine-tuning: batch-norm running statistics 'frozen' as pretrained "
                                     "(default) or 'update'")
    cached_views: int = option(2, "--finetune last (image model): views of each training photo whose "
                                  "activations below the last stage are cached (1: the photo, 2: and its "
                                  "mirror, more: random crops too)")
    text_encoder: str = option("minilm", "minilm (shipped), a model folder, or a name in the local HF cache")
    max_length: int = option(128, "tokens kept of name + description")
    lexical_buckets: int = option(262_144, "hashed n-gram buckets of the text model's lexical branch (0: no "
                                           "lexical branch)")
    lexical_max_chars: int = option(5_000, "characters of a listing's text the lexical branch reads",
                                    cli=False)
    lexical_head_words: int = option(10, "the lexical branch also hashes the first N words (the name) apart "
                                         "(0: off)")
    # the lexical branch starts at zero and its inputs are L2-normalised: it learns faster than the rest
    lexical_lr: float = option(2e-2, "AdamW learning rate of the lexical branch")
    finetune_encoder: bool = option(False, "train the text encoder too", cli=False)
    # pretrained weights move slowly; the new head learns at --lr
    backbone_lr: float = option(5e-5, "AdamW learning rate of a fine-tuned image backbone or text encoder")
    warmup_epochs: float = option(0.0, "linear learning-rate warmup, in epochs (fractions allowed)")
    decay: str = option("none", "learning-rate decay after warmup, per step: none or cosine (to zero at "
                                "the last epoch)")
    grad_clip: float = option(0.0, "clip the gradient norm to this (0: off)")
    feature_batch_size: int = option(32, "batch size when computing frozen features")
    num_workers: int = option(0, "data loader processes when fine-tuning")
    resume: bool = option(False, "continue after the last complete epoch (checkpoints/<model>/last.pt)",
                          cli=False)
    init_from: str | None = option(None, "start from this checkpoint's weights (same model), e.g. fine-tune "
                                         "from a frozen run")
    image_checkpoint: str | None = option(None, "combined: the image branch's checkpoint (default: "
                                                "<checkpoint-dir>/image/best.pt)")
    text_checkpoint: str | None = option(None, "combined: the text branch's checkpoint (default: "
                                               "<checkpoint-dir>/text/best.pt)")
    branches: dict = option({}, "combined: the image and text configs it was built from", cli=False)

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
                            ("patience", 0), ("lexical_buckets", 0), ("lexical_head_words", 0),
                            ("num_workers", 0), ("weight_decay", 0), ("warmup_epochs", 0), ("grad_clip", 0),
                            ("lr", 0), ("lexical_lr", 0), ("backbone_lr", 0)):
            if getattr(self, name) < least:
                found.append(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least {least}")
        return found

    @property
    def kind(self) -> ModelKind:
        return model_kind(self.model)

    @property
    def frozen(self) -> bool:
        return self.finetune == "none" and not self.finetune_encoder


def train_options() -> dict[str, str]:
    """The `train` command's options: every field the CLI sets, with its help."""
    return {item.name: item.metadata["help"] for item in fields(TrainConfig) if item.metadata["cli"]}
