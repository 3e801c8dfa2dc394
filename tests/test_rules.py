"""Rules that remap channel indices: concat, split/chunk, flatten, permute, channel shuffle.

Each test checks the analysis (group sizes, index maps, blocked status and reasons), runs
the dead-channel oracle on the model (pruning random channels must match a copy whose
consumers ignore those channels) and checks the size attributes after surgery.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune
from conftest import assert_output_blocked, group_of, maps, member, names, run_oracle


X16 = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
X8 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- concat
class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 5, 3, padding=1)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), F.relu(self.b(x))], dim=1)
        return self.head(F.relu(self.c(y)))


def test_concat_spans_both_producers_with_offsets():
    model = Concat().eval()
    report = graphprune.analyze(model, X16)
    group = group_of(report, "c.weight", 1)
    assert group.size == 10 and group.prunable and group.exact
    assert maps(group) == {
        ("a.weight", 0): [0, 1, 2, 3],
        ("a.bias", 0): [0, 1, 2, 3],
        ("b.weight", 0): [4, 5, 6, 7, 8, 9],
        ("b.bias", 0): [4, 5, 6, 7, 8, 9],
        ("c.weight", 1): list(range(10)),
    }
    assert group.root == "a"
    # The inputs of a and b are the model input: blocked.
    assert group_of(report, "a.weight", 1).blocked == ["model input"]
    assert_output_blocked(report, "head")

    run_oracle(model, X16, groups=2)
    assert model.a.out_channels + model.b.out_channels == model.c.in_channels == model.c.weight.shape[1]
    assert model.a.out_channels >= 1 and model.b.out_channels >= 1


def test_concat_explicit_channels_land_in_the_right_producer():
    model = Concat().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = graphprune.analyze(model, X16)
    group_of(report, "c.weight", 1).prune([1, 5, 9])  # a's channel 1, b's channels 1 and 5
    assert torch.equal(model.a.weight, before["a.weight"][[0, 2, 3]])
    assert torch.equal(model.b.weight, before["b.weight"][[0, 2, 3, 4]])
    assert torch.equal(model.b.bias, before["b.bias"][[0, 2, 3, 4]])
    assert torch.equal(model.c.weight, before["c.weight"][:, [0, 2, 3, 4, 6, 7, 8]])
    assert (model.a.out_channels, model.b.out_channels, model.c.in_channels) == (3, 4, 7)
    assert model(X16).shape == (1, 2, 16, 16)


# --------------------------------------------------------------------------- split / chunk
class Chunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(4, 6, 1)
        self.right = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        a, b = torch.chunk(self.stem(x), 2, dim=1)
        return self.head(self.left(a) + self.right(b))


class Split(Chunk):
    def forward(self, x):
        a, b = torch.split(self.stem(x), 4, dim=1)
        return self.head(self.left(a) + self.right(b))


class MethodChunk(Chunk):
    def forward(self, x):
        a, b = self.stem(x).chunk(2, 1)
        return self.head(self.left(a) + self.right(b))


@pytest.mark.parametrize("cls", [Chunk, MethodChunk])
def test_chunk_ties_the_jth_channel_of_every_chunk(cls):
    model = cls().eval()
    report = graphprune.analyze(model, X16)
    group = group_of(report, "stem.weight", 0)
    assert group.size == 4 and group.prunable and group.exact
    assert maps(group) == {
        ("stem.weight", 0): [0, 1, 2, 3, 0, 1, 2, 3],
        ("stem.bias", 0): [0, 1, 2, 3, 0, 1, 2, 3],
        ("left.weight", 1): [0, 1, 2, 3],
        ("right.weight", 1): [0, 1, 2, 3],
    }
    # The two branch outputs are added: one group.
    assert group_of(report, "left.weight", 0) is group_of(report, "right.weight", 0)

    run_oracle(model, X16, groups=2)
    assert model.stem.out_channels == 2 * model.left.in_channels == 2 * model.right.in_channels


def test_split_with_a_literal_size_is_blocked():
    model = Split().eval()
    report = graphprune.analyze(model, X16)
    group = group_of(report, "stem.weight", 0)
    assert group.size == 8 and not group.prunable
    assert len(group.blocked) == 1 and "splits at sizes that cannot follow pruning" in group.blocked[0]
    # The offsets of the pieces are still right.
    assert member(group, "left.weight", 1).index_map.tolist() == [0, 1, 2, 3]
    assert member(group, "right.weight", 1).index_map.tolist() == [4, 5, 6, 7]
    # The branch outputs are unaffected.
    assert group_of(report, "left.weight", 0).prunable
    run_oracle(model, X16, groups=1)
    assert model.stem.out_channels == 8


# --------------------------------------------------------------------------- flatten -> Linear
class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.fc1 = nn.Linear(4 * 4 * 4, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(F.relu(self.conv(x)), 1))))


class FlattenModule(FlattenLinear):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.flatten(F.relu(self.conv(x))))))


@pytest.mark.parametrize("cls", [FlattenLinear, FlattenModule])
def test_flatten_repeats_each_channel_over_spatial_columns(cls):
    model = cls().eval()
    report = graphprune.analyze(model, X8)
    group = group_of(report, "conv.weight", 0)
    assert group.size == 4 and group.prunable and group.exact
    assert member(group, "fc1.weight", 1).index_map.tolist() == np.repeat(np.arange(4), 16).tolist()
    assert member(group, "fc1.weight", 1).role == "in"
    assert group_of(report, "fc1.weight", 0).size == 5
    assert_output_blocked(report, "fc2")

    run_oracle(model, X8, groups=2)
    assert model.fc1.in_features == 16 * model.conv.out_channels == model.fc1.weight.shape[1]


# --------------------------------------------------------------------------- channels-last Linear
class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)
        self.mix = nn.Linear(6, 5)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # Linear over channels, NHWC
        n, c, h, w = y.shape
        z = self.mix(y.flatten(2).transpose(1, 2))  # (N, HW, C) tokens
        z = z.transpose(1, 2).reshape(n, -1, h, w)
        return self.head(z)


def test_permute_and_transpose_to_channels_last_linear():
    model = ChannelsLast().eval()
    report = graphprune.analyze(model, X16)
    first = group_of(report, "stem.weight", 0)
    assert first.size == 8 and first.prunable and first.exact
    assert names(first) == {("stem.weight", 0, "out"), ("stem.bias", 0, "out"), ("fc.weight", 1, "in")}
    second = group_of(report, "fc.weight", 0)
    assert second.size == 6 and names(second) == {
        ("fc.weight", 0, "out"), ("fc.bias", 0, "out"), ("mix.weight", 1, "in")}
    third = group_of(report, "mix.weight", 0)
    assert third.size == 5 and member(third, "head.weight", 1).index_map.tolist() == list(range(5))
    assert len(report.prunable_groups) == 3

    run_oracle(model, X16, groups=3)
    assert model.fc.in_features == model.stem.out_channels
    assert model.mix.in_features == model.fc.out_features and model.head.in_channels == model.mix.out_features


# --------------------------------------------------------------------------- channel shuffle
class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(x)


def test_channel_shuffle():
    model = Shuffle().eval()
    report = graphprune.analyze(model, X16)
    group = group_of(report, "stem.weight", 0)
    # channel j of the first half and channel j of the second half land next to each other
    assert group.size == 4 and group.prunable and group.exact
    assert maps(group) == {
        ("stem.weight", 0): [0, 1, 2, 3, 0, 1, 2, 3],
        ("stem.bias", 0): [0, 1, 2, 3, 0, 1, 2, 3],
        ("head.weight", 1): [0, 0, 1, 1, 2, 2, 3, 3],
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    group.prune([1])
    assert torch.equal(model.stem.weight, before["stem.weight"][[0, 2, 3, 4, 6, 7]])
    assert torch.equal(model.head.weight, before["head.weight"][:, [0, 1, 4, 5, 6, 7]])
    assert model(X16).shape == (1, 2, 16, 16)

    model = Shuffle().eval()
    run_oracle(model, X16, groups=1)
    assert model.stem.out_channels == model.head.in_channels == 6
