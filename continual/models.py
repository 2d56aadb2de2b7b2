"""Networks trained from scratch on task streams: a reduced ResNet-18, a small CNN and an MLP.

* ``resnet18-reduced``: the ResNet-18 of the online-CL literature (GEM, mammoth, the AdaB2N code): 3x3 stem with
  stride 1, four stages of two BasicBlocks with widths nf, 2nf, 4nf, 8nf (nf = 20 by default), BatchNorm, global
  average pooling, a linear head. Uses ``F.relu`` inside its blocks, so NaP's insertion does not apply to it.
* ``cnn``: three conv-[BN]-ReLU-maxpool stages and a linear head, built from nn.Sequential (NaP-compatible).
* ``mlp``: Flatten, hidden Linear-ReLU layers, linear head, nn.Sequential (the random-labels / NaP network).

Every model takes images in [0, 1] and provides ``forward_features`` (the pooled input of the head).
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

MODELS = ("resnet18-reduced", "cnn", "mlp")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """ResNet-18 with base width ``nf`` (20 in the online-CL literature) and BatchNorm."""

    def __init__(self, num_classes: int, nf: int = 20, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        planes, layers, in_planes = [nf, 2 * nf, 4 * nf, 8 * nf], [], nf
        for i, (width, stride) in enumerate(zip(planes, (1, 2, 2, 2))):
            blocks = []
            for s in (stride, 1):
                blocks.append(BasicBlock(in_planes, width, s))
                in_planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(8 * nf, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.forward_features(x))


class SequentialNet(nn.Module):
    """``head(body(x))`` with both parts nn.Sequential, so NaP can insert norms and ``forward_features`` exists."""

    def __init__(self, body: nn.Sequential, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def small_cnn(num_classes: int, in_channels: int = 3, width: int = 32, batch_norm: bool = True,
              image_size: int = 32) -> SequentialNet:
    """Three conv3x3-[BN]-ReLU-maxpool2 stages (width, 2w, 4w), global average pool, linear head."""
    layers: list[nn.Module] = []
    channels = in_channels
    for w in (width, 2 * width, 4 * width):
        layers.append(nn.Conv2d(channels, w, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(w))
        layers += [nn.ReLU(), nn.MaxPool2d(2) if image_size >= 8 else nn.Identity()]
        channels = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return SequentialNet(nn.Sequential(*layers), nn.Linear(channels, num_classes))


def mlp(num_classes: int, in_features: int, hidden: Sequence[int] = (256, 256)) -> SequentialNet:
    """Flatten, then Linear-ReLU per hidden width, then a linear head (no normalisation: NaP inserts it)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return SequentialNet(nn.Sequential(*layers), nn.Linear(width, num_classes))


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, width: int | None = None,
                hidden: Sequence[int] | None = None, batch_norm: bool = True) -> nn.Module:
    """A model by name (see :data:`MODELS`); ``width`` is nf (ResNet) or the first conv width (CNN)."""
    if name == "resnet18-reduced":
        return ReducedResNet18(num_classes, nf=width or 20, in_channels=in_channels)
    if name == "cnn":
        return small_cnn(num_classes, in_channels, width or 32, batch_norm=batch_norm, image_size=image_size)
    if name == "mlp":
        return mlp(num_classes, in_channels * image_size * image_size, tuple(hidden or (256, 256)))
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")

