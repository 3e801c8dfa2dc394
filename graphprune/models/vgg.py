"""VGG with BatchNorm for 32x32 inputs."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

CONFIGS: dict[str, list] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """``features`` (conv 3x3 - BN - ReLU blocks and max pools, as in torchvision) then a
    ``classifier`` Linear on the flattened 1x1 map."""

    def __init__(self, config: Sequence[Union[int, str]], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


def _vgg(name: str, num_classes: int) -> VGG:
    return VGG(CONFIGS[name], num_classes=num_classes)


def vgg11_bn(num_classes: int = 10) -> VGG:
    return _vgg("vgg11", num_classes)


def vgg13_bn(num_classes: int = 10) -> VGG:
    return _vgg("vgg13", num_classes)


def vgg16_bn(num_classes: int = 10) -> VGG:
    return _vgg("vgg16", num_classes)


def vgg19_bn(num_classes: int = 10) -> VGG:
    return _vgg("vgg19", num_classes)
