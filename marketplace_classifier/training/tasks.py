"""What one training or evaluation step feeds the model, per model kind and training mode.

Frozen mode feeds cached encoder outputs to the trainable part only (epochs cost
seconds); fine-tuning feeds decoded photos and token ids through the whole model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from marketplace_classifier.serving.model_kinds import IMAGE, ModelKind, model_kind
from marketplace_classifier.serving.processing import lexical_ids, model_inputs, pad_lexical
from marketplace_classifier.serving.settings import LexicalSettings, TextSettings
from marketplace_classifier.serving.taxonomy import Taxonomy
from marketplace_classifier.training.config import TrainConfig
from marketplace_classifier.training.data import CleanData
from marketplace_classifier.training.features import (
    cached,
    compute_features_from_stage_inputs,
    compute_hidden_states,
    compute_stage_inputs,
    file_stamps,
    load_model_image,
)
from marketplace_classifier.training.text_encoder import encoder_identity, load_tokenizer


@dataclass
class Batch:
    inputs: tuple
    labels: torch.Tensor  # the root class of each sample
    levels: torch.Tensor | None = None  # its levels head's class (-1: none; serving/taxonomy.py)


class TrainablePart(nn.Module):
    """The part of a frozen-encoder model that trains, as one module (what DDP wraps)."""

    def __init__(self, model: nn.Module, kind: str | ModelKind):
        super().__init__()
        self.model, self.kind = model, model_kind(kind)

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Each branch's logits (each trains on its own loss)."""
        return getattr(self.model, self.kind.frozen_entry)(*inputs)


class WholeModel(nn.Module):
    """The whole model, answering with each branch's logits (fine-tuning)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        return self.model.branches(*inputs)


class FrozenTask:
    """Cached features in memory; `network` is only the trainable part of the model."""

    def __init__(self, model: nn.Module, kind: str | ModelKind, tensors: dict[str, torch.Tensor],
                 labels: torch.Tensor, splits: list[str], device: torch.device,
                 levels: torch.Tensor | None = None):
        self.model, self.kind, self.tensors, self.device = model, model_kind(kind), tensors, device
        self.network = TrainablePart(model, kind)
        self.labels = labels
        self.levels = levels if levels is not None else torch.full_like(labels, -1)
        self.split_index = {name: torch.tensor([i for i, s in enumerate(splits) if s == name])
                            for name in ("train", "val", "test")}

    def size(self, split: str) -> int:
        return len(self.split_index[split])

    def batches(self, split: str, batch_size: int, order: list[int] | None = None,
                train: bool = False):
        """Batches of `split`, in `order` (positions in the split; default: all, in order)."""
        index = self.split_index[split]
        if order is not None:
            index = index[torch.tensor(order, dtype=torch.long)]
        for start in range(0, len(index), batch_size):
            chosen = index[start:start + batch_size]
            yield Batch(self._inputs(chosen), self.labels[chosen].to(self.device),
                        self.levels[chosen].to(self.device))

    def _inputs(self, chosen: torch.Tensor) -> tuple:
        t, device = self.tensors, self.device
        inputs: tuple = (t["features"][chosen].to(device),) if self.kind.uses_image else ()
        if self.kind.uses_text:  # a photo's row points at its product's text
            rows = t["product_row"][chosen] if self.kind.per_photo else chosen
            hidden, mask = t["hidden"][rows].to(device).float(), t["mask"][rows].to(device)
            inputs += (hidden, mask, *self._lexical(rows))
        return inputs

    def _lexical(self, rows: torch.Tensor) -> tuple:
        if "lexical" not in self.tensors:
            return ()
        ids, counts = pad_lexical([self.tensors["lexical"][row] for row in rows.tolist()])
        return ids.to(self.device), counts.to(self.device)

    def logits(self, inputs: tuple) -> torch.Tensor:
        return self.model.combine(self.network(*inputs))


def frozen_task(model: nn.Module, config: TrainConfig, data: CleanData, device: torch.device,
                cache_dir: Path | None) -> FrozenTask:
    kind = config.kind
    samples = data.samples(kind)
    tensors: dict[str, torch.Tensor] = {}
    if kind.uses_image:
        image_model = kind.image_part(model)
        tensors.update(_image_features(image_model, data, samples, config, device, cache_dir))
    if kind.uses_text:
        text_model = kind.text_part(model)
        products = data.products
        tensors.update(_hidden_states(text_model, products, config, device, cache_dir))
        if text_model.lexical is not None:
            lexical = text_settings(config).lexical
            tensors["lexical"] = [lexical_ids(text, lexical) for text in products["text"]]
        if kind.per_photo:
            row_of = {product_id: row for row, product_id in enumerate(products["id"])}
            tensors["product_row"] = torch.tensor([row_of[p] for p in samples["product_id"]])
    labels = torch.tensor(samples["label"].to_numpy(), dtype=torch.long)
    return FrozenTask(model, kind, tensors, labels, list(samples["split"]), device,
                      data.levels_labels(samples, taxonomy_of(config, data)))


def _image_features(image_model, data: CleanData, samples, config: TrainConfig, device, cache_dir):
    """Frozen features of the photos, derived from the cached activations entering the last stage
    (what a last-stage fine-tuning of the same backbone reuses: the photos are decoded and the
    stages below run once for both)."""
    paths = [data.image_path(image_id) for image_id in samples["id"]]
    stamps = file_stamps(paths)
    parts = _image_parts(image_model, config, stamps, state_digest(image_model.backbone))
    parts["computed"] = "last stage over float16 stage inputs"

    def compute():
        inputs = _stage_inputs(image_model, paths, stamps, config, device, cache_dir)
        return compute_features_from_stage_inputs(image_model, inputs, device, config.feature_batch_size)

    return cached(cache_dir, "image", parts, compute)


def _stage_inputs(image_model, paths: list[Path], stamps: list, config: TrainConfig, device, cache_dir,
                  view: int = 0) -> torch.Tensor:
    """Cached activations entering the last stage of the photos at `paths`, in view `view`."""
    # what enters the last stage does not depend on it: a fine-tuned model finds its cache
    below = state_digest(image_model.backbone, leave_out=image_model.backbone.last_stage())
    parts = _image_parts(image_model, config, stamps, below) | {"cut": "below last stage", "view": view}
    if view > 0:
        parts["seed"] = config.seed
    return cached(cache_dir, "activations", parts, lambda: compute_stage_inputs(
        image_model, paths, config.image_size, device, config.feature_batch_size,
        view=view, seed=config.seed))["activations"]


def _image_parts(image_model, config: TrainConfig, stamps: list, state: str) -> dict:
    """What an image model's cached outputs depend on: the photos' `stamps` (file_stamps) and
    the `state` digest of the weights that compute them, among others."""
    return {"backbone": config.image_backbone, "weights": _weights_identity(config.image_weights),
            "state": state, "image_size": config.image_size, "files": stamps,
            "normalisation": [image_model.mean.flatten().tolist(), image_model.std.flatten().tolist()]}


def state_digest(module: nn.Module, leave_out: nn.Module | None = None) -> str:
    """A digest of a module's weights (but those of `leave_out`, a part of it): cached features
    follow the weights themselves (a combined model over a fine-tuned branch must not reuse the
    frozen branch's features)."""
    left_out = {id(t) for t in [*leave_out.parameters(), *leave_out.buffers()]} if leave_out else set()
    digest = hashlib.sha256()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in left_out:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def _weights_identity(weights: str):
    if weights in ("imagenet", "none"):
        return weights
    return file_stamps([Path(weights)])[0] + [str(Path(weights).resolve())]


def _hidden_states(text_model, products, config: TrainConfig, device, cache_dir):
    from marketplace_classifier.training.text_encoder import load_tokenizer

    texts = list(products["text"])
    parts = {"encoder": encoder_identity(config.text_encoder), "state": state_digest(text_model.encoder),
             "max_length": config.max_length, "texts": texts}
    tokenizer = load_tokenizer(config.text_encoder)
    return cached(cache_dir, "text", parts, lambda: compute_hidden_states(
        text_model, tokenizer, texts, config.max_length, device, config.feature_batch_size))


class LastStagePart(nn.Module):
    """What trains when only an image model's last stage does: last stage, pooling and head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, activations: torch.Tensor) -> list[torch.Tensor]:
        return [self.model.heads(self.model.backbone.from_last_stage(activations.float()))]


class LastStageTask(FrozenTask):
    """`--finetune last` of an image model: the frozen stages run once per photo and view, their
    activations are cached, and each epoch shows every training photo in one of its views, drawn
    at random (augmentation in training only; evaluation sees the plain photo)."""

    def __init__(self, model: nn.Module, views: list[torch.Tensor], labels: torch.Tensor,
                 splits: list[str], device: torch.device, seed: int, levels: torch.Tensor | None = None):
        super().__init__(model, IMAGE, {"activations": views[0]}, labels, splits, device, levels)
        self.network = LastStagePart(model)
        self.train_views = views[1:]  # training photos only, in the split's order
        self.generator = torch.Generator().manual_seed(seed)

    def batches(self, split: str, batch_size: int, order: list[int] | None = None,
                train: bool = False):
        if not train or split != "train":
            yield from super().batches(split, batch_size, order)
            return
        positions = torch.tensor(order if order is not None else range(self.size("train")), dtype=torch.long)
        views = torch.randint(1 + len(self.train_views), (len(positions),), generator=self.generator)
        for start in range(0, len(positions), batch_size):
            rows, chosen = positions[start:start + batch_size], views[start:start + batch_size]
            samples = self.split_index["train"][rows]
            activations = torch.stack([self.tensors["activations"][sample] if view == 0
                                       else self.train_views[view - 1][row] for view, row, sample in
                                       zip(chosen.tolist(), rows.tolist(), samples.tolist(), strict=True)])
            yield Batch((activations.to(self.device),), self.labels[samples].to(self.device),
                        self.levels[samples].to(self.device))

    def _inputs(self, chosen: torch.Tensor) -> tuple:
        return (self.tensors["activations"][chosen].to(self.device),)


def last_stage_task(model: nn.Module, data: CleanData, config: TrainConfig, device, cache_dir
                    ) -> LastStageTask:
    """Cached activations entering the last stage: every photo plain, and the training photos
    in `cached_views - 1` more views (the mirror, then random crops)."""
    samples = data.samples(IMAGE)
    paths = [data.image_path(image_id) for image_id in samples["id"]]
    in_train = [split == "train" for split in samples["split"]]
    train_paths = [path for path, train in zip(paths, in_train, strict=True) if train]
    stamps = file_stamps(paths)
    train_stamps = [stamp for stamp, train in zip(stamps, in_train, strict=True) if train]
    views = [_stage_inputs(model, paths, stamps, config, device, cache_dir)]
    views += [_stage_inputs(model, train_paths, train_stamps, config, device, cache_dir, view)
              for view in range(1, config.cached_views)]
    labels = torch.tensor(samples["label"].to_numpy(), dtype=torch.long)
    return LastStageTask(model, views, labels, list(samples["split"]), device, config.seed,
                         data.levels_labels(samples, taxonomy_of(config, data)))


class RawSamples(Dataset):
    """Decoded photos and/or texts of one split, augmented in training only."""

    def __init__(self, kind: str | ModelKind, data: CleanData, split: str, image_size: int, train: bool,
                 taxonomy: Taxonomy | None = None):
        self.kind, self.data, self.image_size = model_kind(kind), data, image_size
        self.samples = data.samples(kind, split)
        self.levels = data.levels_labels(self.samples, taxonomy).tolist() if taxonomy else None
        self.augment = v2.Compose([v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
                                   v2.RandomHorizontalFlip()]) if train else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        row = self.samples.iloc[index]
        item = {"label": int(row["label"]), "levels": self.levels[index] if self.levels else -1}
        if self.kind.uses_image:
            image = load_model_image(self.data.image_path(row["id"]), self.image_size)
            item["image"] = self.augment(image) if self.augment else image
        if self.kind.uses_text:
            item["text"] = row["text"]
        return item


class RawTask:
    """Whole-model steps over decoded inputs, for fine-tuning."""

    def __init__(self, model: nn.Module, config: TrainConfig, data: CleanData, device: torch.device,
                 tokenizer=None):
        self.model, self.kind, self.data, self.device = model, config.kind, data, device
        self.network = WholeModel(model)
        self.config, self.tokenizer = config, tokenizer

    def size(self, split: str) -> int:
        return len(self.data.samples(self.kind, split))

    def batches(self, split: str, batch_size: int, order: list[int] | None = None,
                train: bool = False):
        """Batches of `split`, in `order` (positions in the split); augmented when `train`."""
        dataset = RawSamples(self.kind, self.data, split, self.config.image_size, train,
                             taxonomy_of(self.config, self.data))
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=self._collate,
                            num_workers=self.config.num_workers)
        yield from loader

    def _collate(self, items: list[dict]) -> Batch:
        images = [item["image"] for item in items] if "image" in items[0] else None
        texts = [item["text"] for item in items] if "text" in items[0] else None
        inputs = model_inputs(self.kind, images, texts, self.tokenizer, text_settings(self.config))
        labels = torch.tensor([item["label"] for item in items], device=self.device)
        levels = torch.tensor([item["levels"] for item in items], device=self.device)
        return Batch(tuple(tensor.to(self.device) for tensor in inputs), labels, levels)

    def logits(self, inputs: tuple) -> torch.Tensor:
        return self.model.combine(self.network(*inputs))


def text_settings(config: TrainConfig) -> TextSettings:
    """The text part of preprocessing.json, from a training configuration."""
    lexical = LexicalSettings(config.lexical_buckets, config.lexical_max_chars,
                              config.lexical_head_words) if config.lexical_buckets else None
    return TextSettings(config.max_length, lexical, config.text_encoder)


def taxonomy_of(config: TrainConfig, data: CleanData) -> Taxonomy | None:
    """The category tree a configuration trains on (None: the roots only)."""
    return data.taxonomy(config.levels, config.min_listings) if config.levels > 1 else None


def make_task(model: nn.Module, config: TrainConfig, data: CleanData, device: torch.device):
    """The frozen (cached features), last-stage (cached activations) or whole-model task a
    training configuration asks for."""
    cache = Path(config.cache_dir) if config.cache_dir else None
    if config.frozen:
        return frozen_task(model, config, data, device, cache)
    if config.kind is IMAGE and config.finetune == "last":
        return last_stage_task(model, data, config, device, cache)
    tokenizer = load_tokenizer(config.text_encoder) if config.kind.uses_text else None
    return RawTask(model, config, data, device, tokenizer)
