"""Self-written models of the ops transformers are written with, without transformers: a
hand-written RMSNorm (a mean over the channels), rotary position embeddings (cos/sin of a
frequency buffer, ``rotate_half`` slicing head_dim in halves) and a sum over channels."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import group_of
from oracle import dead_channel_oracle
from torch import nn

import graphprune
from graphprune.analysis.reasons import BlockKind


class _Rotary(nn.Module):
    """Attention with rotary embeddings, as LLaMA writes it: the frequencies repeated over
    both halves of head_dim, and ``rotate_half`` cutting head_dim at ``x.shape[-1] // 2``.
    Channel ``i`` of a head is tied to ``i + head_dim / 2`` (and to ``inv_freq[i]``)."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        self.register_buffer("inv_freq", 1.0 / 10000**steps, persistent=False)

    @staticmethod
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, x, positions):
        B, N, _ = x.shape
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q, k, v = (p(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = (t * cos + self.rotate_half(t) * sin for t in (q, k))
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.o((attn @ v).transpose(1, 2).reshape(B, N, -1))


ROTARY_INPUTS = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)), torch.arange(5.0))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_rotary_embeddings_tie_the_halves_of_head_dim(capture):
    report = graphprune.analyze(_Rotary().eval(), ROTARY_INPUTS, capture=capture)
    group = group_of(report, "q.weight", 0)
    assert group.prunable and group.exact and group.size == 4  # pairs (i, i + 4) of head_dim 8
    assert {"q", "k", "v", "o"} <= set(group.layers()) and ("inv_freq", 0) in {(m.name, m.dim) for m in group.members}
    # Under fx the cut is read off the shape; torch.export records it as a number the audit checks.
    assert bool(group.assumptions) is (capture == "export")
    summary = dead_channel_oracle(_Rotary().eval(), ROTARY_INPUTS, capture=capture, assumed=True)
    assert summary["groups_tested"] == 1 and summary["params_after"] < summary["params_before"]
    model = _Rotary().eval()
    graphprune.prune(model, 0.5, ROTARY_INPUTS, capture=capture)
    assert model.head_dim == 4 and model.inv_freq.shape == (2,) and model(*ROTARY_INPUTS).shape == (2, 5, 16)


class _LiteralHalf(nn.Module):
    """A slice at a literal 4 of 8 channels: under fx nothing says the cut follows the pruning."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 3)

    def forward(self, x):
        y = self.a(x)
        return self.b(y[..., :4] * y[..., 4:])


def test_a_slice_at_a_literal_blocks_under_fx():
    group = group_of(graphprune.analyze(_LiteralHalf().eval(), torch.randn(2, 4), capture="fx"), "a.weight", 0)
    assert not group.prunable and group.blocked[0].kind is BlockKind.COLLAPSED


class _RMSNormMLP(nn.Module):
    """A hand-written RMSNorm between two linears (LLaMA's ``LlamaRMSNorm``)."""

    def __init__(self):
        super().__init__()
        self.a, self.weight, self.b = nn.Linear(4, 8), nn.Parameter(torch.ones(8)), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.b(self.weight * h)


class _ChannelSum(nn.Module):
    """A sum over the channels added back: dead channels add nothing, so it prunes exactly."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) + y.sum(1, keepdim=True)


def test_an_average_over_channels_is_approximate_and_a_sum_exact():
    x = torch.randn(2, 4)
    group = group_of(graphprune.analyze(_RMSNormMLP().eval(), x), "a.weight", 0)
    assert group.prunable and not group.exact and "averages over this dimension" in group.notes[0]
    assert ("weight", 0) in {(m.name, m.dim) for m in group.members}
    model = _RMSNormMLP().eval()
    graphprune.prune(model, 0.5, x)
    assert model.weight.shape == (4,) and model(x).shape == (2, 3)

    images = torch.randn(1, 3, 4, 4)
    assert group_of(graphprune.analyze(_ChannelSum().eval(), images), "a.weight", 0).exact
    assert dead_channel_oracle(_ChannelSum().eval(), images)["groups_tested"] == 1


class _FusedQKV(nn.Module):
    """q, k and v from one projection, split by one size (GPT-2's ``split(self.split_size)``);
    ``embed_dim`` has the same value but only ``__init__`` reads it."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.embed_dim = dim
        self.num_heads, self.head_dim, self.split_size = heads, self.embed_dim // heads, self.embed_dim
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        parts = self.qkv(x).split(self.split_size, dim=-1)
        q, k, v = (parts[i].view(B, N, self.num_heads, -1).transpose(1, 2) for i in range(3))
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.o((attn @ v).transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_split_by_one_size_ties_its_equal_parts(capture):
    x = torch.randn(2, 5, 16)
    group = group_of(graphprune.analyze(_FusedQKV().eval(), x, capture=capture), "qkv.weight", 0)
    assert group.prunable and group.exact and group.size == 8 and "o" in group.layers()  # (q_j, k_j, v_j) per unit
    summary = dead_channel_oracle(_FusedQKV().eval(), x, capture=capture, assumed=True)
    assert summary["groups_tested"] == 1 and summary["params_after"] < summary["params_before"]
    model = _FusedQKV().eval()
    graphprune.prune(model, 0.5, x, capture=capture)
    assert model.split_size == 8 and model.embed_dim == 16 and model.qkv.out_features == 24 and model(x).shape == x.shape


class _AlibiAttention(nn.Module):
    """Scores as BLOOM computes them: ``baddbmm(alibi, q, k.T)``, a per-head linear bias added
    to the product in one op, on q, k, v of shape (batch * heads, tokens, head_dim); the
    values are multiplied by the transposed probabilities' transpose (``x.T`` of a matrix)."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.inv_norm_factor = self.head_dim**-0.5  # set once, as BLOOM does: pruning keeps the scale
        self.register_buffer("slopes", torch.tensor([0.5, 0.25]), persistent=False)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).reshape(
            3, B * self.num_heads, N, self.head_dim)
        alibi = (self.slopes[:, None] * torch.arange(N, dtype=x.dtype)).repeat(B, 1)[:, None, :]
        probs = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=self.inv_norm_factor).softmax(-1)
        out = torch.bmm(probs, v).view(B, self.num_heads, N, self.head_dim).transpose(1, 2).reshape(B, N, -1)
        return self.o(out) + (x.sum(-1).T @ x.sum(-1)).mean()


def test_baddbmm_contracts_head_width_and_a_transposed_matrix_reverses():
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    report = graphprune.analyze(_AlibiAttention().eval(), x, capture="fx")
    q_width = group_of(report, "qkv.weight", 0)
    assert q_width.prunable and {"qkv", "o"} <= set(q_width.layers())
    summary = dead_channel_oracle(_AlibiAttention().eval(), x, capture="fx")
    assert summary["groups_tested"] >= 1 and summary["params_after"] < summary["params_before"]
    # torch.export records aten.baddbmm and aten.numpy_T: both have a rule there too
    exported = graphprune.analyze(_AlibiAttention().eval(), x, capture="export")
    assert not [r for g in exported.groups for r in g.blocked if "baddbmm" in r or "numpy_T" in r]


class _TransposedLinear(nn.Linear):
    """A linear layer written as ``x @ self.weight.T`` (Falcon's ``FalconLinear``): the weight
    is read directly by a matmul, through a transpose that is an attribute."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class _TransposedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = _TransposedLinear(8, 32), _TransposedLinear(32, 8)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)).mT.mT)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_weight_read_through_its_transpose_attribute_prunes_exactly(capture):
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    group = group_of(graphprune.analyze(_TransposedMLP().eval(), x, capture=capture), "up.weight", 0)
    assert group.prunable and group.exact and {("down.weight", 1), ("up.bias", 0)} <= {(m.name, m.dim) for m in group.members}
    summary = dead_channel_oracle(_TransposedMLP().eval(), x, capture=capture)
    assert summary["groups_tested"] == 1 and summary["params_after"] < summary["params_before"]


class _ScaledInForward(nn.Module):
    """Attention that divides its scores by ``math.sqrt(self.head_dim)`` in forward (MPNet does):
    the scale follows the pruned head width, so pruning it is approximate. With the scale set
    once in ``__init__`` (``set_once``), it stays and pruning is exact."""

    def __init__(self, set_once: bool, dim: int = 16, heads: int = 2):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scaling = self.head_dim**-0.5 if set_once else None
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1)
        scores = scores * self.scaling if self.scaling is not None else scores / math.sqrt(self.head_dim)
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("set_once", [False, True])
def test_a_scale_computed_from_the_head_width_in_forward_makes_its_pruning_approximate(capture, set_once):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    group = group_of(graphprune.analyze(_ScaledInForward(set_once).eval(), x, capture=capture), "qkv.weight", 0)
    assert group.prunable and group.exact is set_once
    if not set_once:
        assert "scales by 2.82843, computed from head_dim = 8 in forward" in group.status
    else:
        summary = dead_channel_oracle(_ScaledInForward(True).eval(), x, capture=capture, assumed=True)
        assert summary["groups_tested"] == 1


class _BiasedAttention(nn.Module):
    """T5-style attention: a learned bias per head (an embedding of the relative position) goes
    to ``scaled_dot_product_attention`` as its ``attn_mask``, added to every head's scores."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_bias = nn.Embedding(9, heads)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        positions = torch.arange(N, device=x.device)
        bias = self.relative_bias((positions[None, :] - positions[:, None]).clamp(-4, 4) + 4).permute(2, 0, 1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_per_head_bias_given_as_attn_mask_goes_with_the_heads(capture):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    widths = graphprune.analyze(_BiasedAttention().eval(), x, capture=capture)
    assert not group_of(widths, "relative_bias.weight", 1).prunable  # the heads stay: their bias too
    heads = graphprune.analyze(_BiasedAttention().eval(), x, capture=capture, prune_heads=True)
    group = group_of(heads, "relative_bias.weight", 1)
    assert group.prunable and group.size == 4 and "qkv" in group.layers()
    summary = dead_channel_oracle(_BiasedAttention().eval(), x, capture=capture, prune_heads=True, assumed=True)
    assert summary["groups_tested"] >= 1


class _RepeatedKeyValueHeads(nn.Module):
    """Grouped-query attention that repeats each key/value head for its query heads with
    ``repeat_interleave`` (as many GQA implementations do, and GPT-J its rotary frequencies)."""

    def __init__(self, dim: int = 16, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        kv = self.kv(x).chunk(2, dim=-1)
        k, v = kv[0].view(B, N, -1, self.head_dim).transpose(1, 2), kv[1].view(B, N, -1, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(groups, dim=1), torch.repeat_interleave(v, groups, dim=1)
        attn = (q @ k.transpose(-2, -1) * 0.3).softmax(-1)
        return self.o((attn @ v).transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("prune_heads", [False, True])
def test_key_value_heads_repeated_by_repeat_interleave_prune_with_their_query_heads(capture, prune_heads):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    report = graphprune.analyze(_RepeatedKeyValueHeads().eval(), x, capture=capture, prune_heads=prune_heads)
    assert not [r for g in report.groups for r in g.blocked if "repeat_interleave" in r]
    summary = dead_channel_oracle(_RepeatedKeyValueHeads().eval(), x, capture=capture, prune_heads=prune_heads,
                                  assumed=True)
    assert summary["groups_tested"] >= 1 and summary["params_after"] < summary["params_before"]
