"""What is blocked, never guessed: ops without a rule and hard-coded sizes; and sizes
computed in forward, which must be tied or blocked so that the pruned model still runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune
from graphprune.analysis.reasons import BlockKind
from conftest import group_of, member, run_oracle
from oracle import dead_channel_oracle


X16 = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- unknown op
class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = torch.renorm(self.stem(x), 2, 1, 5.0)  # an op no rule knows
        return self.head(F.relu(self.mid(x)))


class UnknownMethod(Unknown):
    def forward(self, x):
        x = self.stem(x).renorm(2, 1, 5.0)
        return self.head(F.relu(self.mid(x)))


@pytest.mark.parametrize("cls, kind", [(Unknown, "function"), (UnknownMethod, "method")])
def test_unknown_op_blocks_with_a_reason_naming_it(cls, kind):
    model = cls().eval()
    report = graphprune.analyze(model, X16)
    # Both the producer feeding the op and the consumer reading its output are blocked.
    for name, dim in (("stem.weight", 0), ("mid.weight", 1)):
        group = group_of(report, name, dim)
        assert not group.prunable
        assert len(group.blocked) == 1
        assert group.blocked[0].startswith(f"no rule for {kind} ") and "renorm" in group.blocked[0]
        assert "renorm" in group.status
    # Channels not touched by the op stay prunable.
    assert group_of(report, "mid.weight", 0).prunable
    run_oracle(model, X16, groups=1)
    assert model.stem.out_channels == 8 and model.mid.in_channels == 8


# --------------------------------------------------------------------------- hard-coded view
class FixedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 16x16 -> 8x8: 8*8*8 = 512
        self.fc1 = nn.Linear(512, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.conv(x).view(-1, 512))))


class FlexibleView(FixedView):
    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.conv(x).view(x.size(0), -1))))


def test_view_with_a_hard_coded_size_is_blocked():
    model = FixedView().eval()
    report = graphprune.analyze(model, X16)
    group = group_of(report, "conv.weight", 0)
    assert group.size == 8 and not group.prunable
    assert len(group.blocked) == 1 and "fixed size 512" in group.blocked[0]
    assert member(group, "fc1.weight", 1).index_map.tolist() == np.repeat(np.arange(8), 64).tolist()
    assert group_of(report, "fc1.weight", 0).prunable
    run_oracle(model, X16, groups=1)
    assert model.conv.out_channels == 8 and model.fc1.in_features == 512


def test_view_with_inferred_size_is_prunable():
    model = FlexibleView().eval()
    report = graphprune.analyze(model, X16)
    group = group_of(report, "conv.weight", 0)
    assert group.size == 8 and group.prunable and group.exact
    run_oracle(model, X16, groups=2)
    assert model.fc1.in_features == 64 * model.conv.out_channels


# --------------------------------------------------------------------------- sizes computed in forward
class DynamicSplit(nn.Module):
    """split at a size read from the tensor: the halves must stay equal after pruning."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(4, 6, 1)
        self.right = nn.Conv2d(4, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        a, b = y.split(y.size(1) // 2, 1)
        return self.head(self.left(a) + self.right(b))


class DynamicSlice(DynamicSplit):
    def forward(self, x):
        y = self.stem(x)
        c = y.size(1) // 2
        return self.head(self.left(y[:, :c]) + self.right(y[:, c:]))


class Unflatten(nn.Module):
    """Linear -> unflatten to (C, 4, 4) with literal spatial sizes, as in a DCGAN generator."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8 * 4 * 4)
        self.conv = nn.Conv2d(8, 5, 3, padding=1)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, z):
        return self.head(F.relu(self.conv(self.fc(z).unflatten(1, (-1, 4, 4)))))


def _safe_to_prune(cls, inputs):
    """Whatever the analysis decides (tie, block), pruning must keep the model working."""
    report = graphprune.analyze(cls().eval(), inputs)
    model = cls().eval()
    summary = dead_channel_oracle(model, inputs, seed=0, zero_producers=False)
    model = cls().eval()
    with torch.no_grad():
        shape = model(inputs).shape
    graphprune.prune(model, 0.5, inputs)
    with torch.no_grad():
        assert model(inputs).shape == shape
    return report, summary


def test_split_at_a_size_computed_from_the_tensor():
    report, _ = _safe_to_prune(DynamicSplit, X16)
    group = group_of(report, "stem.weight", 0)
    # Sound answers: the j-th channel of both halves tied (as chunk does), or blocked.
    if group.prunable:
        assert member(group, "stem.weight", 0).index_map.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_slice_at_a_bound_computed_from_the_tensor():
    report, _ = _safe_to_prune(DynamicSlice, X16)
    assert group_of(report, "left.weight", 0).prunable


def test_unflatten_with_literal_sizes():
    report, _ = _safe_to_prune(Unflatten, torch.randn(2, 6))
    assert group_of(report, "conv.weight", 0).prunable


# --------------------------------------------------------------------------- resampled channels
class ChannelsResampled(nn.Module):
    """Channels moved into a dimension that an op interpolates, pools, pads or convolves over."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.pool, self.pad3d = nn.AdaptiveAvgPool1d(4), nn.ConstantPad3d((0, 0, 0, 0, 1, 1), 0.0)
        self.conv3d = nn.Conv3d(1, 1, (3, 1, 1), padding=(1, 0, 0))
        self.out = nn.LazyLinear(3)

    def forward(self, x):
        h = self.c(x)
        if self.kind == "interpolate":
            h = F.interpolate(h.unsqueeze(1), size=(16, 6, 6)).squeeze(1)
        elif self.kind == "pool":
            h = self.pool(h.flatten(2).transpose(1, 2))
        elif self.kind == "pad":
            h = F.pad(h, (0, 0, 0, 0, 1, 1))
        elif self.kind == "pad_module":
            h = self.pad3d(h)
        else:
            h = self.conv3d(h.unsqueeze(1))
        return self.out(h.flatten(1))


@pytest.mark.parametrize("kind", ["interpolate", "pool", "pad", "pad_module", "conv3d"])
def test_channels_that_an_op_resamples_are_blocked(kind):
    model = ChannelsResampled(kind).eval()
    x = torch.randn(2, 3, 6, 6)
    model(x)  # materialise the lazy head
    group = group_of(graphprune.analyze(model, x), "c.weight", 0)
    assert not group.prunable
    assert any(r.kind is BlockKind.COLLAPSED and ("convolves, pools or resamples" in r or "pads" in r)
               for r in group.blocked), group.blocked
