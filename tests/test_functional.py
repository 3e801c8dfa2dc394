"""Functional layers: F.conv*, F.linear, F.batch_norm, F.group_norm, F.instance_norm,
F.embedding and F.prelu get the module rules, whoever calls them: module subclasses that
override forward (as timm's BatchNormAct2d and Linear do) or plain code. Every case is
checked by the dead-channel oracle and by the sizes of the pruned model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune
from conftest import group_of, run_oracle

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass calling F.batch_norm with its own tensors."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps))


class Linear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class StdConv(nn.Conv2d):
    """A weight-standardised conv: the weight is computed in the graph before F.conv2d."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FunctionalConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GroupNorm(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class PReLU(nn.PReLU):
    def forward(self, x):
        return F.prelu(x, self.weight)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = StdConv(3, 16, 3, padding=1), BatchNormAct(16)
        self.dw, self.bn2 = FunctionalConv(16, 16, 3, padding=1, groups=16), BatchNormAct(16)
        self.pw, self.gn, self.act = FunctionalConv(16, 24, 1), GroupNorm(4, 24), PReLU(24)
        self.fc1, self.fc2 = Linear(24, 32), Linear(32, 10)

    def forward(self, x):
        h = self.bn2(self.dw(self.bn(self.stem(x))))
        h = self.act(self.gn(self.pw(h))).mean((2, 3))
        return self.fc2(F.relu(self.fc1(h)))


def test_functional_layers_prune_like_their_modules():
    report = graphprune.analyze(Net().eval(), X)
    stem = group_of(report, "stem.weight", 0)
    assert stem.prunable and {"bn", "dw", "bn2", "pw"} <= set(stem.layers())
    assert {(m.name, m.role) for m in stem.members} >= {("bn.weight", "scale"), ("bn.running_mean", "stat"),
                                                        ("dw.weight", "out"), ("pw.weight", "in")}
    assert group_of(report, "pw.weight", 0).prunable and group_of(report, "fc1.weight", 0).prunable
    in_groups = {(m.name, m.dim) for g in report.groups for m in g.members}
    assert ("dw.weight", 2) not in in_groups and ("dw.weight", 3) not in in_groups  # kernel dims are no channels
    run_oracle(Net().eval(), X, groups=3)

    model = Net().eval()
    graphprune.prune(model, 0.5, X)
    assert (model.stem.out_channels, model.bn.num_features, model.dw.groups, model.dw.in_channels) == (8, 8, 8, 8)
    assert (model.pw.out_channels, model.gn.num_groups, model.act.num_parameters, model.fc1.out_features) == (12, 2, 12, 16)
    assert model(X).shape == (2, 10)


class EmbedAndTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.up = nn.ConvTranspose1d(16, 8, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens):
        h = F.embedding(tokens, self.embed.weight).transpose(1, 2)
        h = F.conv_transpose1d(h, self.up.weight, self.up.bias)
        return self.head(h.mean(2))


def test_functional_embedding_and_transposed_conv():
    tokens = torch.randint(0, 20, (2, 6))
    report = graphprune.analyze(EmbedAndTranspose().eval(), tokens)
    assert group_of(report, "embed.weight", 1).prunable and group_of(report, "up.weight", 1).prunable
    run_oracle(EmbedAndTranspose().eval(), tokens, groups=2)


class LiteralGroups(nn.Module):
    """A grouped F.conv2d whose groups count is a literal no module holds: it cannot follow."""

    def __init__(self):
        super().__init__()
        self.stem, self.weight = nn.Conv2d(3, 8, 1), nn.Parameter(torch.randn(8, 2, 3, 3))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.conv2d(self.stem(x), self.weight, padding=1, groups=4))


@pytest.mark.parametrize("model", [LiteralGroups])
def test_a_literal_count_blocks_the_channels_it_ties(model):
    group = group_of(graphprune.analyze(model().eval(), X), "stem.weight", 0)
    assert not group.prunable and "groups=4 is no 'groups' attribute" in group.blocked[0]


class _StandardisedConv(nn.Conv2d):
    """A conv whose weight is standardised per output channel on every call (timm's
    ScaledStdConv2d in NFNet), with F.batch_norm in training mode over the weight's input
    channels and kernel: pruning input channels changes the statistics, so it is approximate."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class _Standardised(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), _StandardisedConv(8, 4, 1)  # 1x1: its input channels are the merged dim

    def forward(self, x):
        return self.b(self.a(x).relu())


def test_statistics_computed_over_channels_make_their_pruning_approximate():
    report = graphprune.analyze(_Standardised().eval(), X)
    into_standardised = group_of(report, "a.weight", 0)
    assert into_standardised.prunable and not into_standardised.exact
    assert "normalisation statistics" in into_standardised.notes[0]
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8, track_running_stats=False), nn.Conv2d(8, 4, 1)).eval()
    assert group_of(graphprune.analyze(model, X), "0.weight", 0).exact  # batch statistics per channel: exact


class _RMSNormed(nn.Module):
    """nn.RMSNorm (F.rms_norm): normalises over the channels like LayerNorm, without a bias."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(3, 8), nn.RMSNorm(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def test_rms_norm_prunes_approximately_with_its_weight():
    x = torch.randn(2, 5, 3)
    for capture in ("fx", "export"):
        group = group_of(graphprune.analyze(_RMSNormed().eval(), x, capture=capture), "a.weight", 0)
        assert group.prunable and not group.exact
        assert ("norm.weight", 0, "scale") in {(m.name, m.dim, m.role) for m in group.members}
    model = _RMSNormed().eval()
    graphprune.prune(model, 0.5, x)
    assert model.norm.normalized_shape == (4,) and model(x).shape == (2, 5, 4)
