"""Training settings, importable without torch (the CLI builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from marketplace_classifier.serving.model_kinds import ModelKind, model_kind


@dataclass
class TrainConfig:
    model: str = "image"
    data_dir: str = "data/clean"
    checkpoint_dir: str = "checkpoints"
    runs_dir: str = "runs"
    cache_dir: str | None = "cache/features"
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 0
    device: str = "auto"
    seed: int = 0
    image_backbone: str = "resnet50"
    image_weights: str = "imagenet"
    image_size: int = 224
    finetune: str = "none"  # image backbone: none (frozen, cached features) | last | all
    bn_stats: str = "frozen"  # fine-tuning: batch-norm statistics frozen (as pretrained) or update
    cached_views: int = 2  # --finetune last of an image model: cached views of each training photo
    text_encoder: str = "minilm"
    max_length: int = 128
    lexical_buckets: int = 262_144  # hashed word/character n-gram branch of the text model (0: off)
    lexical_max_chars: int = 5_000
    lexical_head_words: int = 10  # the first words (the name) as their own n-grams too (0: off)
    lexical_lr: float = 2e-2  # the lexical branch starts at zero and its inputs are L2-normalised
    finetune_encoder: bool = False
    backbone_lr: float = 5e-5  # pretrained weights move slowly; the new head at --lr
    warmup_epochs: float = 0.0  # linear warmup of every learning rate, in epochs (fractions too)
    decay: str = "none"  # none | cosine (to zero at the last epoch, per step)
    grad_clip: float = 0.0  # largest gradient norm (0: off)
    feature_batch_size: int = 32
    num_workers: int = 0
    resume: bool = False  # continue from checkpoints/<model>/last.pt
    init_from: str | None = None  # start from this checkpoint's weights (e.g. the frozen run's head)
    image_checkpoint: str | None = None  # combined: the image branch (default <checkpoint_dir>/image)
    text_checkpoint: str | None = None  # combined: the text branch (default <checkpoint_dir>/text)
    branches: dict = field(default_factory=dict)  # combined: the image and text configs

    @property
    def kind(self) -> ModelKind:
        return model_kind(self.model)

    @property
    def frozen(self) -> bool:
        return self.finetune == "none" and not self.finetune_encoder
