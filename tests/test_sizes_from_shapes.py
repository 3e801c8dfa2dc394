"""Sizes computed at run time from a tensor's shape follow the pruning: a reshape sized by
``x.shape[2]`` or ``C // self.num_heads`` keeps fitting once x's channels shrink, because the
two dims are made to prune together. A size computed any other way blocks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune
from conftest import group_of
from oracle import dead_channel_oracle


class Attention(nn.Module):
    """timm's Attention: head width computed from the input's width, output reshaped to it."""

    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attention = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attention, self.head = nn.Linear(12, 16), Attention(), nn.Linear(16, 5)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attention(x)
        return self.head((x + self.mlp(x)).mean(1))


X = torch.randn(2, 7, 12)


def test_head_width_read_off_the_stream_prunes_with_the_stream():
    report = graphprune.analyze(Block().eval(), X)
    stream = group_of(report, "embed.weight", 0)
    assert stream is group_of(report, "attention.qkv.weight", 0) and stream.prunable
    assert stream.size == 4  # a unit: one channel of every head's width, and the stream channels it is reshaped to
    torch.manual_seed(0)
    assert dead_channel_oracle(Block().eval(), X)["groups_tested"] == 2  # the stream and the MLP
    model = Block().eval()
    graphprune.prune(model, 0.5, X)
    assert model.embed.out_features == 8 and model.attention.qkv.out_features == 24 and model(X).shape == (2, 5)


def test_whole_heads_cannot_follow_a_width_divided_by_a_literal_head_count():
    """With prune_heads, C // 4 would have to stay the head width while C shrinks by whole heads:
    the stream blocks, with the reason, and the rest still prunes."""
    report = graphprune.analyze(Block().eval(), X, prune_heads=True)
    assert not group_of(report, "embed.weight", 0).prunable
    model = Block().eval()
    graphprune.prune(model, 0.5, X, prune_heads=True)
    assert model.mlp[0].out_features == 16 and model(X).shape == (2, 5)


class Reshaped(nn.Module):
    def __init__(self, size: str):
        super().__init__()
        self.size = size
        self.conv, self.other, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h, g = self.conv(x), self.other(x)
        n, c, height, width = h.shape
        channels = {"own": c, "other": g.shape[1], "computed": c + 0}[self.size]
        return self.out(h.flatten(2).reshape(n, channels, height, width) + g)


@pytest.mark.parametrize("size, prunable", [("own", True), ("other", True), ("computed", False)])
def test_a_reshape_follows_sizes_read_off_shapes_only(size, prunable):
    x = torch.randn(2, 3, 4, 4)
    group = group_of(graphprune.analyze(Reshaped(size).eval(), x), "conv.weight", 0)
    assert group.prunable == prunable
    if not prunable:
        assert "a target size that no tensor's shape gives" in group.blocked[0]
    model = Reshaped(size).eval()
    graphprune.prune(model, 0.5, x)
    assert model(x).shape == (2, 4, 4, 4) and model.conv.out_channels == (4 if prunable else 8)
