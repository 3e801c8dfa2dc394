"""Rules of layers and elementwise ops: depthwise and grouped convs, residual adds,
squeeze-excitation, layer scales, GroupNorm; and the dead-channel oracle's own tests.

Each test checks the analysis, runs the dead-channel oracle on the model and checks the size
attributes after surgery.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune
import graphprune.analysis.analyzer
import graphprune.pruning.surgery
from conftest import group_of, maps, member, names, run_oracle
from oracle import dead_channel_oracle


X16 = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- depthwise / grouped conv
class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.dw(F.relu(self.pw(x))))))


def test_depthwise_conv_passes_channels_through():
    model = Depthwise().eval()
    report = graphprune.analyze(model, X16)
    group = group_of(report, "pw.weight", 0)
    assert group.size == 8 and group.prunable and group.exact
    assert names(group) == {
        ("pw.weight", 0, "out"), ("pw.bias", 0, "out"), ("dw.weight", 0, "out"), ("dw.bias", 0, "out"),
        ("bn.weight", 0, "scale"), ("bn.bias", 0, "shift"), ("bn.running_mean", 0, "stat"),
        ("bn.running_var", 0, "stat"), ("head.weight", 1, "in"),
    }
    assert all(m.index_map.tolist() == list(range(8)) for m in group.members)

    run_oracle(model, X16, groups=1)
    c = model.pw.out_channels
    assert c < 8
    assert model.dw.in_channels == model.dw.out_channels == model.dw.groups == c
    assert model.dw.weight.shape == (c, 1, 3, 3)
    assert model.bn.num_features == c == model.bn.running_mean.numel() == model.head.in_channels


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.gconv = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.gconv(F.relu(self.stem(x)))))


def test_grouped_conv_prunes_whole_conv_groups():
    model = Grouped().eval()
    report = graphprune.analyze(model, X16)
    group = group_of(report, "gconv.weight", 0)
    assert group.size == 4 and group.prunable and group.exact
    assert maps(group) == {
        ("stem.weight", 0): [0, 0, 1, 1, 2, 2, 3, 3],
        ("stem.bias", 0): [0, 0, 1, 1, 2, 2, 3, 3],
        ("gconv.weight", 0): np.repeat(np.arange(4), 4).tolist(),
        ("gconv.bias", 0): np.repeat(np.arange(4), 4).tolist(),
        ("head.weight", 1): np.repeat(np.arange(4), 4).tolist(),
    }

    run_oracle(model, X16, groups=1)  # removes one conv group of four
    g = model.gconv
    assert (g.groups, g.in_channels, g.out_channels) == (3, 6, 12)
    assert g.weight.shape == (12, 2, 3, 3)
    assert model.stem.out_channels == 6 and model.head.in_channels == 12


# --------------------------------------------------------------------------- residual add
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.conv2(F.relu(self.conv1(x)))
        return self.head(x)


def test_residual_add_couples_both_branches():
    model = Residual().eval()
    report = graphprune.analyze(model, X16)
    stream = group_of(report, "stem.weight", 0)
    assert stream.size == 8 and stream.prunable
    assert names(stream) == {
        ("stem.weight", 0, "out"), ("stem.bias", 0, "out"), ("conv1.weight", 1, "in"),
        ("conv2.weight", 0, "out"), ("conv2.bias", 0, "out"), ("head.weight", 1, "in"),
    }
    inner = group_of(report, "conv1.weight", 0)
    assert inner.size == 6 and inner is not stream and inner.prunable
    assert len(report.prunable_groups) == 2

    run_oracle(model, X16, groups=2)
    assert model.stem.out_channels == model.conv2.out_channels == model.conv1.in_channels == model.head.in_channels


# --------------------------------------------------------------------------- squeeze-excitation
class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1).flatten(1)))))
        return self.head(x * s[:, :, None, None])


class SEMean(SE):
    def forward(self, x):
        x = F.relu(self.stem(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return self.head(x * s.unsqueeze(-1).unsqueeze(-1))


@pytest.mark.parametrize("cls", [SE, SEMean])
def test_squeeze_excitation_broadcast_mul(cls):
    model = cls().eval()
    report = graphprune.analyze(model, X16)
    group = group_of(report, "stem.weight", 0)
    assert group.size == 8 and group.prunable and group.exact
    assert names(group) == {
        ("stem.weight", 0, "out"), ("stem.bias", 0, "out"), ("fc1.weight", 1, "in"),
        ("fc2.weight", 0, "out"), ("fc2.bias", 0, "out"), ("head.weight", 1, "in"),
    }
    squeeze = group_of(report, "fc1.weight", 0)
    assert squeeze.size == 4 and squeeze.prunable
    assert names(squeeze) == {("fc1.weight", 0, "out"), ("fc1.bias", 0, "out"), ("fc2.weight", 1, "in")}

    run_oracle(model, X16, groups=2)
    assert model.stem.out_channels == model.fc1.in_features == model.fc2.out_features == model.head.in_channels


# --------------------------------------------------------------------------- layer scale
class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.dw(x) * self.gamma
        return self.head(x)


def test_layer_scale_parameter_is_a_member():
    model = LayerScale().eval()
    report = graphprune.analyze(model, X16)
    group = group_of(report, "stem.weight", 0)
    assert group.size == 8 and group.prunable and group.exact
    gamma = member(group, "gamma", 0)
    assert gamma.role == "param" and gamma.module == "" and gamma.param == "gamma"
    assert gamma.tensor is model.gamma
    assert gamma.index_map.tolist() == list(range(8))

    before = model.gamma.detach().clone()
    report.groups[group.id].prune([2, 5])
    assert isinstance(model.gamma, nn.Parameter) and model.gamma.requires_grad
    assert torch.equal(model.gamma, before[[0, 1, 3, 4, 6, 7]])
    assert model(X16).shape == (1, 2, 16, 16)

    model = LayerScale().eval()
    run_oracle(model, X16, groups=1)
    assert model.gamma.shape == (model.stem.out_channels, 1, 1)


# --------------------------------------------------------------------------- GroupNorm
class GN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.gn(self.stem(x))))


def test_group_norm_prunes_whole_norm_groups():
    model = GN().eval()
    with torch.no_grad():  # non-trivial affine parameters
        model.gn.weight.uniform_(0.5, 1.5)
        model.gn.bias.uniform_(-0.5, 0.5)
    report = graphprune.analyze(model, X16)
    group = group_of(report, "gn.weight", 0)
    assert group.size == 4 and group.prunable and group.exact
    assert maps(group) == {
        ("stem.weight", 0): [0, 0, 1, 1, 2, 2, 3, 3],
        ("stem.bias", 0): [0, 0, 1, 1, 2, 2, 3, 3],
        ("gn.weight", 0): [0, 0, 1, 1, 2, 2, 3, 3],
        ("gn.bias", 0): [0, 0, 1, 1, 2, 2, 3, 3],
        ("head.weight", 1): [0, 0, 1, 1, 2, 2, 3, 3],
    }
    assert member(group, "gn.weight", 0).role == "scale" and member(group, "gn.bias", 0).role == "shift"

    run_oracle(model, X16, groups=1)
    assert (model.gn.num_groups, model.gn.num_channels) == (3, 6)
    assert model.gn.weight.shape == (6,) and model.stem.out_channels == 6


# --------------------------------------------------------------------------- the oracle itself
def test_oracle_catches_surgery_that_keeps_the_wrong_channels(monkeypatch):
    shrink = graphprune.pruning.surgery._Transaction.shrink

    def keep_leading(self, tensor, keep):  # right count, wrong positions
        shrink(self, tensor, {dim: np.arange(len(kept)) for dim, kept in keep.items()})

    monkeypatch.setattr(graphprune.pruning.surgery._Transaction, "shrink", keep_leading)
    for zero_producers in (True, False):
        with pytest.raises(AssertionError, match="dead-channel oracle failed"):
            dead_channel_oracle(Residual().eval(), X16, seed=0, zero_producers=zero_producers)


def test_oracle_catches_a_consumer_missing_from_its_group(monkeypatch):
    build = graphprune.analysis.analyzer.build_groups

    def drop_head(state, roots):
        groups = build(state, roots)
        for group in groups:
            group.members = [m for m in group.members if not (m.name == "head.weight" and m.dim == 1)]
        return groups

    monkeypatch.setattr(graphprune.analysis.analyzer, "build_groups", drop_head)
    with pytest.raises(AssertionError, match="dead-channel oracle failed"):
        dead_channel_oracle(Residual().eval(), X16, seed=0, zero_producers=False)
