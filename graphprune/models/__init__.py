"""CIFAR-sized model zoo: 3x3 stems for 32x32 inputs, all traceable by torch.fx.

>>> from graphprune.models import get_model, list_models
>>> model = get_model("resnet20", num_classes=10)
>>> "vgg16_bn" in list_models()
True

Families:

* ``vgg11_bn`` / ``vgg13_bn`` / ``vgg16_bn`` / ``vgg19_bn``: the VGG configurations with
  BatchNorm, five 2x2 max pools (32 -> 1) and a single ``Linear(512, num_classes)``;
* ``resnet18`` / ``34`` / ``50`` / ``101`` / ``152``: ImageNet ResNets with a 3x3 stride-1
  stem and no max pool (stages at 32, 16, 8, 4 pixels);
* ``resnet20`` / ``56`` / ``110``: He et al.'s CIFAR ResNets (three stages of 16, 32 and 64
  channels, ``(depth - 2) / 6`` basic blocks each) with *option B* shortcuts: a 1x1
  convolution + BatchNorm where the shape changes, identity elsewhere;
* ``mobilenet_v2``: MobileNetV2 with a stride-1 stem and the first stride-2 block made
  stride 1 (spatial sizes 32, 32, 16, 8, 4).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .mobilenet import MobileNetV2, mobilenet_v2
from .resnet import (
    CifarResNet,
    ResNet,
    resnet18,
    resnet20,
    resnet34,
    resnet50,
    resnet56,
    resnet101,
    resnet110,
    resnet152,
)
from .vgg import VGG, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "vgg11_bn": vgg11_bn,
    "vgg13_bn": vgg13_bn,
    "vgg16_bn": vgg16_bn,
    "vgg19_bn": vgg19_bn,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "mobilenet_v2": mobilenet_v2,
}


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`, sorted."""
    return sorted(_REGISTRY)


def get_model(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised CIFAR model (32x32 inputs) called ``name`` (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return _REGISTRY[key](num_classes=num_classes)


__all__ = [
    "get_model", "list_models", "VGG", "ResNet", "CifarResNet", "MobileNetV2",
    "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet20", "resnet56", "resnet110",
    "mobilenet_v2",
]
