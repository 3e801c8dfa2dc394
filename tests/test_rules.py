"""One small hand-made model per propagation rule.

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
import graphprune.analysis
import graphprune.surgery
from conftest import group_of
from oracle import dead_channel_oracle


# --------------------------------------------------------------------------- helpers
def member(group: graphprune.Group, name: str, dim: int) -> graphprune.Member:
    found = [m for m in group.members if m.name == name and m.dim == dim]
    assert len(found) == 1, f"{name} dim {dim} is not a member of group {group.id}"
    return found[0]


def names(group: graphprune.Group) -> set:
    return {(m.name, m.dim, m.role) for m in group.members}


def maps(group: graphprune.Group) -> dict:
    return {(m.name, m.dim): m.index_map.tolist() for m in group.members}


def run_oracle(model: nn.Module, inputs, groups: int) -> dict:
    # Consumers only: also catches a consumer missing from its group (none of these models
    # has a weightless consumer such as an attention product).
    summary = dead_channel_oracle(model, inputs, seed=0, zero_producers=False)
    assert summary["groups_tested"] == groups
    assert summary["params_after"] < summary["params_before"]
    return summary


def assert_output_blocked(report: graphprune.Report, layer: str) -> None:
    head = group_of(report, f"{layer}.weight", 0)
    assert head.blocked == ["reaches output"]
    assert not head.prunable
    assert head.status == "blocked: reaches output"


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


# --------------------------------------------------------------------------- unknown op
class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = torch.cumsum(self.stem(x), dim=1)
        return self.head(F.relu(self.mid(x)))


class UnknownMethod(Unknown):
    def forward(self, x):
        x = self.stem(x).cumsum(1)
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
        assert group.blocked[0].startswith(f"no rule for {kind} ") and "cumsum" in group.blocked[0]
        assert "cumsum" in group.status
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


# --------------------------------------------------------------------------- tied weights
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(F.relu(self.fc(self.emb(tokens))))


def test_tied_weights_couple_both_uses_and_stay_tied():
    tokens = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    model = Tied().eval()
    report = graphprune.analyze(model, tokens)
    hidden = group_of(report, "emb.weight", 1)
    # The embedding's width is both fc's input and, through the tied weight, out's input:
    # so fc's input and output widths are one group.
    assert hidden.size == 16 and hidden.prunable
    assert {(m.name, m.dim) for m in hidden.members} == {
        ("emb.weight", 1), ("fc.weight", 0), ("fc.weight", 1), ("fc.bias", 0)}
    assert group_of(report, "emb.weight", 0).blocked == ["reaches output"]
    # The tied dim is a producer and a consumer at once: zero it as a producer too.
    dead_channel_oracle(model, tokens, seed=0, zero_producers=True)
    assert model.out.weight is model.emb.weight
    assert model.emb.embedding_dim == model.out.in_features == model.fc.in_features == model.fc.out_features < 16


# --------------------------------------------------------------------------- the oracle itself
def test_oracle_catches_surgery_that_keeps_the_wrong_channels(monkeypatch):
    shrink = graphprune.surgery._Transaction.shrink

    def keep_leading(self, tensor, keep):  # right count, wrong positions
        shrink(self, tensor, {dim: np.arange(len(kept)) for dim, kept in keep.items()})

    monkeypatch.setattr(graphprune.surgery._Transaction, "shrink", keep_leading)
    for zero_producers in (True, False):
        with pytest.raises(AssertionError, match="dead-channel oracle failed"):
            dead_channel_oracle(Residual().eval(), X16, seed=0, zero_producers=zero_producers)


def test_oracle_catches_a_consumer_missing_from_its_group(monkeypatch):
    build = graphprune.analysis.build_groups

    def drop_head(state, roots):
        groups = build(state, roots)
        for group in groups:
            group.members = [m for m in group.members if not (m.name == "head.weight" and m.dim == 1)]
        return groups

    monkeypatch.setattr(graphprune.analysis, "build_groups", drop_head)
    with pytest.raises(AssertionError, match="dead-channel oracle failed"):
        dead_channel_oracle(Residual().eval(), X16, seed=0, zero_producers=False)
