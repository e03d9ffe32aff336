"""Checkpoints: building the model a configuration describes, and saving and loading its
weights atomically and strictly. Evaluation, export and the benchmark need only this module."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from marketplace_classifier.serving.files import atomic_write
from marketplace_classifier.serving.model_kinds import COMBINED, IMAGE, TEXT
from marketplace_classifier.serving.taxonomy import Taxonomy
from marketplace_classifier.training.backbones import build_backbone
from marketplace_classifier.training.config import TrainConfig
from marketplace_classifier.training.models import CombinedClassifier, ImageClassifier, TextClassifier
from marketplace_classifier.training.text_encoder import load_encoder

# Buffers a model gained after checkpoints were first written, each at the value that answers as
# the checkpoint did before it existed: a constant, or the saved buffer of that name beside it
# (the lexical branch's levels were mixed by the roots' weights before they had their own).
ADDED_BUFFERS = {"levels_mix": (1.0, 0.0), "levels_branch_mix": "mix"}


def current_state(model: nn.Module, state: dict) -> dict:
    """`state` completed with the buffers `model` gained since it was saved, at their neutral
    value; anything else missing or unexpected is still refused by the strict load."""
    added = {}
    for name in dict(model.named_buffers()):
        prefix, _, own = name.rpartition(".")
        neutral = ADDED_BUFFERS.get(own)
        if neutral is None or name in state:
            continue
        if isinstance(neutral, str):
            sibling = f"{prefix}.{neutral}" if prefix else neutral
            if sibling in state:
                added[name] = state[sibling].clone()
        else:
            added[name] = torch.tensor(neutral)
    return {**state, **added}


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def _image_model(config: TrainConfig, num_classes: int, pretrained: bool, levels: int) -> nn.Module:
    weights = config.image_weights if pretrained else "none"
    return ImageClassifier(build_backbone(config.image_backbone, weights), num_classes, levels=levels)


def _text_model(config: TrainConfig, num_classes: int, pretrained: bool, levels: int) -> nn.Module:
    return TextClassifier(load_encoder(config.text_encoder)[0], num_classes, config.lexical_buckets, levels,
                          lexical_levels_rank=config.lexical_levels_rank,
                          lexical_levels_buckets=config.lexical_levels_buckets)


def _combined_model(config: TrainConfig, num_classes: int, pretrained: bool, levels: int) -> nn.Module:
    image = build_model(config_from(config.branches["image"]), num_classes, pretrained, levels)
    text = build_model(config_from(config.branches["text"]), num_classes, pretrained, levels)
    return CombinedClassifier(image, text, num_classes, levels=levels)


BUILDERS = {IMAGE: _image_model, TEXT: _text_model, COMBINED: _combined_model}


def build_model(config: TrainConfig, num_classes: int, pretrained: bool = True, levels: int = 0) -> nn.Module:
    """The untrained model of the configuration's kind (ValueError for an unknown kind), with a
    levels head over `levels` categories below the roots (0: none)."""
    return BUILDERS[config.kind](config, num_classes, pretrained, levels)


def checkpoint_taxonomy(checkpoint: dict) -> Taxonomy:
    """The category tree a checkpoint's model answers in (one level for a root-only model)."""
    roots = [checkpoint["index_to_name"][str(i)] for i in range(len(checkpoint["index_to_name"]))]
    return Taxonomy.from_json(roots, checkpoint.get("taxonomy"))


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file and rename, so a crash never leaves half a file."""
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def config_from(saved: dict) -> TrainConfig:
    """The configuration a checkpoint was trained with (older ones had no lexical branch, answered
    the roots only, and then had no lexical levels)."""
    older = {"lexical_buckets": 0, "lexical_head_words": 0, "levels": 1, "lexical_levels_rank": 0,
             "lexical_levels_buckets": 0}
    return TrainConfig(**(older | saved))


def save_checkpoint(path: Path, model: nn.Module, config: TrainConfig, **extra) -> None:
    atomic_save({"config": asdict(config), "state_dict": model.state_dict(), **extra}, path)


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint was trained as and load its weights strictly."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found: train that model first")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    config = config_from(checkpoint["config"])
    model = build_model(config, len(checkpoint["index_to_name"]), pretrained=False,
                        levels=len(checkpoint_taxonomy(checkpoint).terminals))
    model.load_state_dict(current_state(model, checkpoint["state_dict"]), strict=True)
    return model.eval(), checkpoint
