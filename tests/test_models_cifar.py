"""graphprune.models: CIFAR variants, traceable by torch.fx and prunable by graphprune.prune."""
from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

import graphprune
from graphprune.models import get_model, list_models
from conftest import randomize_batch_norms
from oracle import dead_channel_oracle

NAMES = [
    "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnet20", "resnet56", "resnet110", "mobilenet_v2",
]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models():
    assert list_models() == sorted(NAMES)


def test_get_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resnet20"):
        get_model("resnet21")
    with pytest.raises(ValueError):
        get_model("resnet20", num_classes=0)
    with pytest.raises(TypeError):
        get_model(20)
    assert isinstance(get_model("ResNet20"), nn.Module)


def test_cifar_stems_and_depths():
    assert get_model("resnet18").conv1.kernel_size == (3, 3) and get_model("resnet18").conv1.stride == (1, 1)
    assert get_model("mobilenet_v2").features[0][0].stride == (1, 1)
    for name, depth in (("resnet20", 20), ("resnet56", 56), ("resnet110", 110)):
        model = get_model(name)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) + 1 == depth  # 3x3 convs + the classifier; 1x1 shortcuts are extra (option B)
        assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels, model.layer3[0].conv1.out_channels] == [16, 32, 64]
        assert model.layer2[0].shortcut[0].kernel_size == (1, 1)


@pytest.mark.parametrize("name", NAMES)
def test_traceable_and_prunable(name):
    model = get_model(name, num_classes=7).eval()
    x = torch.randn(1, 3, 32, 32)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(x)
        assert expected.shape == (1, 7)
        assert torch.equal(traced(x), expected)
    before = _params(model)
    pruned = graphprune.prune(model, 0.5, x)
    assert pruned is model
    assert _params(model) < 0.5 * before
    with torch.no_grad():
        assert model(x).shape == (1, 7)


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn", "mobilenet_v2"])
def test_dead_channel_oracle(name):
    torch.manual_seed(0)
    model = randomize_batch_norms(get_model(name))
    summary = dead_channel_oracle(model, torch.randn(2, 3, 32, 32))
    assert summary["groups_tested"] == summary["prunable_groups"] > 0
    assert summary["params_after"] < summary["params_before"]
