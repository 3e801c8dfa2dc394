"""Attention: timm-style (manual and fused), nn.MultiheadAttention and ViT, in both head modes."""
import pytest
import torch
import torchvision
from torch import nn

import graphprune
from conftest import group_of
from oracle import dead_channel_oracle


class TimmAttention(nn.Module):
    def __init__(self, dim=32, num_heads=4, fused=False):
        super().__init__()
        self.num_heads, self.head_dim, self.fused = num_heads, dim // num_heads, fused
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Encoder(nn.Module):
    """Residual attention without LayerNorm, so every group is exact."""

    def __init__(self, attention):
        super().__init__()
        self.embed, self.attention, self.head = nn.Linear(12, 32), attention, nn.Linear(32, 5)

    def forward(self, x):
        x = self.embed(x)
        if isinstance(self.attention, nn.MultiheadAttention):
            x = x + self.attention(x, x, x, need_weights=False)[0]
        else:
            x = x + self.attention(x)
        return self.head(x.mean(1))


def build(kind):
    torch.manual_seed(0)
    if kind == "mha":
        return Encoder(nn.MultiheadAttention(32, 4, batch_first=True)).eval()
    return Encoder(TimmAttention(fused=kind == "fused")).eval()


def head_attrs(model):
    attention = model.attention
    return attention.num_heads, attention.head_dim


@pytest.mark.parametrize("kind", ["manual", "fused", "mha"])
@pytest.mark.parametrize("prune_heads", [False, True])
def test_attention_oracle_and_attributes(kind, prune_heads):
    x = torch.randn(2, 7, 12)
    result = dead_channel_oracle(build(kind), x, fraction=0.5, prune_heads=prune_heads)
    # nn.MultiheadAttention scales by 1/sqrt(head_dim): shrinking head_dim is approximate.
    if kind == "mha" and not prune_heads:
        assert result["groups_tested"] == 0 and result["prunable_groups"] == 1
    else:
        assert result["groups_tested"] >= 1

    model = build(kind)
    report = graphprune.analyze(model, x, prune_heads=prune_heads)
    # nn.MultiheadAttention ties q/k/v to the stream; so does timm-style attention, whose output
    # is reshaped to the width C read off its input: the heads live in the stream's group.
    qkv_group = group_of(report, "attention.in_proj_weight" if kind == "mha" else "attention.qkv.weight", 0)
    assert qkv_group.prunable and qkv_group.root == "embed"
    assert qkv_group.size == (4 if prune_heads else 8)  # 4 heads, or head_dim 8 shared by all heads
    graphprune.prune(model, 0.5, x, prune_heads=prune_heads)
    assert head_attrs(model) == ((2, 8) if prune_heads else (4, 4))
    assert model(x).shape == (2, 5)


def test_fused_attention_default_scale_is_approximate():
    class Fused(TimmAttention):
        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))

    report = graphprune.analyze(Encoder(Fused()).eval(), torch.randn(2, 7, 12))
    group = group_of(report, "attention.qkv.weight", 0)
    assert group.prunable and not group.exact
    assert "scale" in group.notes[0]


@pytest.mark.parametrize("prune_heads", [False, True])
def test_vit_prunes_stream_mlp_and_heads(prune_heads):
    model = torchvision.models.vit_b_32(image_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    before = sum(p.numel() for p in model.parameters())
    graphprune.prune(model, 0.5, x, prune_heads=prune_heads)
    attention = model.encoder.layers[0].self_attention
    assert (attention.num_heads, attention.head_dim) == ((6, 64) if prune_heads else (12, 32))
    assert model.hidden_dim == attention.embed_dim == 384
    assert model.encoder.layers[0].mlp[0].out_features == 1536
    assert model(x).shape == (1, 1000)
    assert sum(p.numel() for p in model.parameters()) < 0.4 * before


class SquareHeads(nn.Module):
    """4 heads of width 4: the head count and the width have the same value, so only the
    heads table (num_heads / head_dim) and the split's structure tell which axis is which."""

    def __init__(self):
        super().__init__()
        self.embed, self.attention, self.head = nn.Linear(12, 16), TimmAttention(dim=16, num_heads=4), nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        return self.head((x + self.attention(x)).mean(1))


@pytest.mark.parametrize("prune_heads", [False, True])
def test_heads_are_found_by_the_heads_table_not_by_matching_a_value(prune_heads):
    x = torch.randn(2, 7, 12)
    torch.manual_seed(0)
    result = dead_channel_oracle(SquareHeads().eval(), x, fraction=0.5, prune_heads=prune_heads)
    assert result["groups_tested"] >= 1  # the stream with the heads (or their width)
    torch.manual_seed(0)
    model = SquareHeads().eval()
    graphprune.prune(model, 0.5, x, prune_heads=prune_heads)
    assert head_attrs(model) == ((2, 4) if prune_heads else (4, 2))
    assert model(x).shape == (2, 5)


class ChannelShuffle(nn.Module):
    """A reshape into (groups, channels per group) is no attention: prune_heads leaves it alone."""

    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.conv(x)
        n, c, height, width = h.shape
        return self.out(h.view(n, 2, c // 2, height, width).transpose(1, 2).reshape(n, c, height, width))


def test_prune_heads_changes_only_splits_into_declared_heads():
    x = torch.randn(1, 3, 4, 4)
    groups = [[(g.size, g.status) for g in graphprune.analyze(ChannelShuffle().eval(), x, prune_heads=heads).groups]
              for heads in (False, True)]
    assert groups[0] == groups[1]
    assert (4, "prunable") in groups[0]  # the shuffle's channel j of each half is one channel
