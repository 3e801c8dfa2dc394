"""Self-written models reproducing the failure classes found on timm, without timm:
a module called twice (fx names its second call ``cpe@1``), a repeat count computed from a
shape, and split sizes held in attributes (fasternet's partial convolution)."""
from __future__ import annotations

import torch
from conftest import group_of, run_oracle
from oracle import dead_channel_oracle
from torch import nn

import graphprune
from graphprune.analysis.reasons import BlockKind

X = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(0))


class PositionalConv(nn.Module):
    """CoaT's conditional position encoding, called twice on the same stream."""

    def __init__(self):
        super().__init__()
        self.proj, self.width = nn.Conv2d(4, 4, 3, padding=1, groups=4), 4

    def forward(self, x):
        return x + self.proj(x).view(x.shape[0], self.width, -1).view_as(x)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.cpe, self.head = nn.Conv2d(3, 4, 1), PositionalConv(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.cpe(self.cpe(self.stem(x))))


def test_a_module_called_twice_is_found_by_its_name_each_time():
    report = graphprune.analyze(CalledTwice().eval(), X)
    assert group_of(report, "stem.weight", 0).prunable
    run_oracle(CalledTwice().eval(), X, groups=1)


class ClassToken(nn.Module):
    """A class token repeated over the batch by a count read off the input's shape."""

    def __init__(self):
        super().__init__()
        self.embed, self.token, self.head = nn.Linear(4, 8), nn.Parameter(torch.randn(1, 1, 8)), nn.Linear(8, 2)

    def forward(self, x):
        tokens = self.embed(x)
        return self.head(torch.cat([self.token.repeat(x.shape[0], 1, 1), tokens], 1)).mean(1)


def test_a_repeat_count_computed_from_a_shape():
    x = torch.randn(2, 5, 4)
    group = group_of(graphprune.analyze(ClassToken().eval(), x), "embed.weight", 0)
    assert group.prunable and "token" in {m.name for m in group.members}
    run_oracle(ClassToken().eval(), x, groups=1)


class PartialConv(nn.Module):
    """fasternet's PConv: split at sizes held in attributes, convolve one part."""

    def __init__(self, dim=16, parts=4):
        super().__init__()
        self.dim_conv3 = dim // parts
        self.dim_untouched = dim - self.dim_conv3
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1, bias=False)

    def forward(self, x):
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), x2), 1)


class FasterNetBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.mixer, self.head = nn.Conv2d(3, 16, 1), PartialConv(), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.mixer(self.stem(x)))


def test_split_sizes_held_in_attributes_follow_each_part():
    report = graphprune.analyze(FasterNetBlock().eval(), X)
    assert group_of(report, "stem.weight", 0).prunable
    run_oracle(FasterNetBlock().eval(), X, groups=1)
    model = FasterNetBlock().eval()
    graphprune.prune(model, 0.5, X)
    mixer = model.mixer
    assert mixer.dim_conv3 == mixer.partial_conv3.in_channels < 4 and mixer.dim_untouched < 12
    assert model(X).shape == (1, 4, 5, 5)


class _Normalized(nn.Module):
    """``F.normalize`` over the channels (as xcit's cross-covariance attention normalises q
    and k): a dead channel adds nothing to the norm, so they prune exactly; over the
    positions, the channels pass through."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.nn.functional.normalize(self.a(x), dim=self.dim))


def test_normalize_over_the_channels_prunes_them_exactly():
    x = torch.randn(1, 3, 6, 6)
    for capture in ("fx", "export"):  # torch.export writes it out: the norm, then a division by it expanded
        for dim in (1, -1):
            group = group_of(graphprune.analyze(_Normalized(dim).eval(), x, capture=capture), "a.weight", 0)
            assert group.prunable and group.exact
            assert dead_channel_oracle(_Normalized(dim).eval(), x, capture=capture)["groups_tested"] == 1


class _Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: a Linear whose weight is stored as ``(in, out)``, applied with
    ``torch.addmm`` and its width held in ``nf``."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.nf = nf
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf) / nx**0.5), nn.Parameter(torch.randn(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class _TransposedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = _Conv1D(6, 16), _Conv1D(16, 6)

    def forward(self, x):
        return self.c_proj(torch.nn.functional.gelu(self.c_fc(x)))


def test_addmm_with_a_transposed_weight():
    x = torch.randn(2, 5, 6)
    for capture in ("fx", "export"):
        group = group_of(graphprune.analyze(_TransposedMLP().eval(), x, capture=capture), "c_fc.weight", 1)
        assert group.prunable and {(m.name, m.dim, m.role) for m in group.members} == {
            ("c_fc.weight", 1, "out"), ("c_fc.bias", 0, "out"), ("c_proj.weight", 0, "in")}
    run_oracle(_TransposedMLP().eval(), x, groups=1)
    model = _TransposedMLP().eval()
    graphprune.prune(model, 0.5, x)
    assert model.c_fc.nf == 8 and model.c_proj.weight.shape == (8, 6) and model(x).shape == (2, 5, 6)


class _ChannelsLastPad(nn.Module):
    """Padding a channels-last tensor (as Swin V2's patch merging does): the pair for the
    channels is (0, 0), so they pass; padding them makes new ones, which blocks them."""

    def __init__(self, channel_pad: int):
        super().__init__()
        self.channel_pad = channel_pad
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8 + 2 * channel_pad, 4)

    def forward(self, x):
        y = torch.nn.functional.pad(self.a(x), (self.channel_pad, self.channel_pad, 0, 1, 1, 0))
        return self.b(y)


def test_a_pad_changes_only_the_dims_it_pads():
    x = torch.randn(1, 5, 5, 3)
    for capture in ("fx", "export"):
        assert group_of(graphprune.analyze(_ChannelsLastPad(0).eval(), x, capture=capture), "a.weight", 0).prunable
        padded = group_of(graphprune.analyze(_ChannelsLastPad(1).eval(), x, capture=capture), "a.weight", 0)
        assert not padded.prunable and padded.blocked[0].kind is BlockKind.COLLAPSED
    run_oracle(_ChannelsLastPad(0).eval(), x, groups=1)


class _SpatialAttention(nn.Module):
    """CBAM-style spatial attention (timm's csatv2): the channel mean and max, each of size 1,
    joined into 2 channels. Those 2 cannot shrink: their producers make one each."""

    def __init__(self):
        super().__init__()
        self.a, self.conv = nn.Conv2d(3, 8, 1), nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        pooled = torch.cat([y.mean(dim=1, keepdim=True), y.amax(dim=1, keepdim=True)], dim=1)
        return y * self.conv(pooled).sigmoid()


def test_size_1_pieces_of_a_concat_cannot_shrink():
    for capture in ("fx", "export"):
        report = graphprune.analyze(_SpatialAttention().eval(), X, capture=capture)
        joined = group_of(report, "conv.weight", 1)
        assert not joined.prunable and joined.blocked[0].kind is BlockKind.FIXED_SIZE
    assert dead_channel_oracle(_SpatialAttention().eval(), X)["groups_tested"] == 0  # nothing exact to prune


class _SharedHeadDim(nn.Module):
    """q, k and v each viewed with the one ``head_dim`` attribute: v's head width cannot shrink
    alone, since the attribute sizes the views of q and k too (timm's Gemma 4 ViT)."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.o((attn @ v).transpose(1, 2).reshape(B, N, -1))


class _SharedGroupCount(nn.Module):
    """One ``num_groups`` attribute for group norms over 8 and 16 channels: no pruning keeps
    both counts consistent with it."""

    def __init__(self):
        super().__init__()
        self.num_groups = 4
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 16, 1), nn.Conv2d(8, 2, 1), nn.Conv2d(16, 2, 1)

    def forward(self, x):
        y = torch.nn.functional.group_norm(self.a(x), self.num_groups)
        z = torch.nn.functional.group_norm(self.b(x), self.num_groups)
        return self.c(y) + self.d(z)


def test_dims_that_follow_one_attribute_prune_together():
    x = torch.randn(2, 5, 16)
    report = graphprune.analyze(_SharedHeadDim().eval(), x)
    group = group_of(report, "v.weight", 0)
    assert group.prunable and {"q", "k", "v", "o"} <= set(group.layers())
    summary = dead_channel_oracle(_SharedHeadDim().eval(), x)  # q @ k consumes without weights: zero producers
    assert summary["groups_tested"] == 1 and summary["params_after"] < summary["params_before"]
    model = _SharedHeadDim().eval()
    graphprune.prune(model, 0.5, x)
    assert model.head_dim == 4 and model.v.out_features == 8 and model(x).shape == (2, 5, 16)

    report = graphprune.analyze(_SharedGroupCount().eval(), X)
    for name in ("a.weight", "b.weight"):
        blocked = group_of(report, name, 0).blocked
        assert blocked and any("num_groups sizes dims that cannot keep one count" in r for r in blocked)
