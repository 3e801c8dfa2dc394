"""Rules for the long tail of ops (issue 24), each proven by the dead-channel oracle under both
front-ends: einsum, pixel (un)shuffle, glu, masked_fill, tensor_split, cosine_similarity, outer,
view_as_complex / view_as_real (Llama's complex rotary embeddings), reshape_as under
torch.export, and reshape sizes computed as products of shape values (``c * h``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import group_of, maps
from oracle import dead_channel_oracle
from torch import nn

import graphprune
from graphprune.analysis.reasons import BlockKind

CAPTURES = ["fx", "export"]


def _seeded(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _oracle(model: nn.Module, inputs, capture: str, groups: int) -> dict:
    """The oracle (torch.export's recorded sizes taken as read off shapes) testing ``groups`` groups."""
    summary = dead_channel_oracle(model, inputs, capture=capture, assumed=True)
    assert summary["groups_tested"] == groups and summary["params_after"] < summary["params_before"]
    return summary


# ----- einsum
class EinsumAttention(nn.Module):
    """Attention written with einsum: scores ``bhid,bhjd->bhij``, output ``bhij,bhjd->bhid``."""

    def __init__(self, dim: int = 16, num_heads: int = 2):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        attention = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(-1)
        return self.proj(torch.einsum("bhij,bhjd->bhid", attention, v).transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("capture", CAPTURES)
def test_einsum_attention_contracts_the_head_width_of_queries_and_keys(capture):
    x = _seeded(2, 5, 16)
    report = graphprune.analyze(EinsumAttention().eval(), x, capture=capture)
    scores, values = group_of(report, "q.weight", 0), group_of(report, "v.weight", 0)
    assert scores is group_of(report, "k.weight", 0) and values is group_of(report, "proj.weight", 1)
    assert scores.prunable and values.prunable and scores is not values
    _oracle(EinsumAttention().eval(), x, capture, groups=2)


class EinsumLinear(nn.Module):
    """A linear layer written as an einsum with a Parameter (``bi,oi->bo`` and its variants)."""

    def __init__(self, equation: str, weight_shape: tuple = (5, 8)):
        super().__init__()
        self.equation = equation
        self.fc, self.w, self.out = nn.Linear(6, 8), nn.Parameter(torch.randn(*weight_shape)), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.einsum(self.equation, self.fc(x).relu(), self.w))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("equation, weight_shape, x", [
    ("bi,oi->bo", (5, 8), (4, 6)),
    (" b i , o i ", (5, 8), (4, 6)),  # implicit output (letters seen once, sorted), spaces
    ("...d,de->...e", (8, 5), (2, 3, 6)),  # an ellipsis over the leading dims
])
def test_einsum_with_a_parameter_maps_kept_and_summed_letters(capture, equation, weight_shape, x):
    x = _seeded(*x)
    report = graphprune.analyze(EinsumLinear(equation, weight_shape).eval(), x, capture=capture)
    summed, kept = weight_shape.index(8), weight_shape.index(5)
    assert group_of(report, "w", summed) is group_of(report, "fc.weight", 0)  # the summed letter
    assert group_of(report, "w", kept) is group_of(report, "out.weight", 1)  # the kept letter
    _oracle(EinsumLinear(equation, weight_shape).eval(), x, capture, groups=2)


class Sublist(nn.Module):
    """``einsum`` with operands and sublists of dim numbers, a form the rule does not read."""

    def __init__(self):
        super().__init__()
        self.fc, self.w = nn.Linear(6, 8), nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        return torch.einsum(self.fc(x), [0, 1], self.w, [2, 1], [0, 2])


def test_einsum_in_sublist_form_blocks():
    group = group_of(graphprune.analyze(Sublist().eval(), _seeded(4, 6), capture="fx"), "fc.weight", 0)
    assert not group.prunable and group.blocked[0].kind is BlockKind.NO_RULE and "einsum" in str(group.blocked[0])


# ----- pixel shuffle
class ESPCN(nn.Module):
    """Sub-pixel super-resolution: conv -> pixel_shuffle -> conv."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.shuffle, self.out = nn.PixelShuffle(2), nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        h = self.c2(torch.tanh(self.c1(x)))
        return self.out(F.pixel_shuffle(h, 2) if self.functional else self.shuffle(h))


class Unshuffled(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.c1, self.unshuffle, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.PixelUnshuffle(2), nn.Conv2d(16, 5, 1)

    def forward(self, x):
        h = self.c1(x).relu()
        return self.c2(F.pixel_unshuffle(h, 2) if self.functional else self.unshuffle(h))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("functional", [False, True])
def test_pixel_shuffle_output_channel_owns_r_squared_input_channels(capture, functional):
    x = _seeded(2, 1, 6, 6)
    group = group_of(graphprune.analyze(ESPCN(functional).eval(), x, capture=capture), "c2.weight", 0)
    assert group.prunable and group.size == 4
    assert maps(group)[("c2.weight", 0)] == np.repeat(np.arange(4), 4).tolist()
    assert maps(group)[("out.weight", 1)] == list(range(4))
    _oracle(ESPCN(functional).eval(), x, capture, groups=2)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("functional", [False, True])
def test_pixel_unshuffle_spreads_a_channel_over_r_squared(capture, functional):
    x = _seeded(2, 3, 6, 6)
    group = group_of(graphprune.analyze(Unshuffled(functional).eval(), x, capture=capture), "c1.weight", 0)
    assert group.prunable and maps(group)[("c2.weight", 1)] == np.repeat(np.arange(4), 4).tolist()
    _oracle(Unshuffled(functional).eval(), x, capture, groups=1)


# ----- glu and tensor_split
class Gated(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc, self.glu, self.out = nn.Linear(6, 16), nn.GLU(), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "tensor_split":
            a, b = torch.tensor_split(h, 2, dim=-1)
            return self.out(a * b.sigmoid())
        return self.out(self.glu(h) if self.kind == "module" else F.glu(h, dim=-1))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("kind", ["function", "module", "tensor_split"])
def test_glu_ties_channel_i_to_i_plus_half(capture, kind):
    x = _seeded(4, 6)
    group = group_of(graphprune.analyze(Gated(kind).eval(), x, capture=capture), "fc.weight", 0)
    assert group.prunable and maps(group)[("fc.weight", 0)] == list(range(8)) * 2
    _oracle(Gated(kind).eval(), x, capture, groups=1)


class SplitAt(nn.Module):
    """``tensor_split`` at an index held in a module attribute, which follows the pruning."""

    def __init__(self):
        super().__init__()
        self.first = 6
        self.fc, self.a, self.b = nn.Linear(6, 16), nn.Linear(6, 3), nn.Linear(10, 3)

    def forward(self, x):
        a, b = torch.tensor_split(self.fc(x), [self.first], dim=-1)
        return self.a(a) + self.b(b)


@pytest.mark.parametrize("capture", CAPTURES)
def test_tensor_split_at_an_attribute_index_follows_the_pruning(capture):
    x = _seeded(4, 6)
    model = SplitAt().eval()
    _oracle(model, x, capture, groups=1)
    assert model.first == model.a.in_features < 6 and model(x.double()).shape == (4, 3)


class LiteralSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.a, self.b = nn.Linear(6, 16), nn.Linear(6, 3), nn.Linear(10, 3)

    def forward(self, x):
        a, b = torch.tensor_split(self.fc(x), [6], dim=-1)
        return self.a(a) + self.b(b)


def test_tensor_split_at_a_literal_index_blocks_under_fx():
    group = group_of(graphprune.analyze(LiteralSplit().eval(), _seeded(4, 6), capture="fx"), "fc.weight", 0)
    assert not group.prunable and group.blocked[0].kind is BlockKind.FIXED_SIZE


# ----- masked_fill, cosine_similarity, outer
class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, mask):
        h = self.fc(x)
        h = h.masked_fill(h < 0, 0.5)  # a mask of the same shape
        return self.out(torch.masked_fill(h, mask[:, :, None], 0.0))  # a mask broadcast over the channels


@pytest.mark.parametrize("capture", CAPTURES)
def test_masked_fill_is_elementwise_with_its_mask(capture):
    inputs = (_seeded(2, 3, 6), _seeded(2, 3) > 0)
    assert group_of(graphprune.analyze(Masked().eval(), inputs, capture=capture), "fc.weight", 0).prunable
    _oracle(Masked().eval(), inputs, capture, groups=1)


class Cosine(nn.Module):
    def __init__(self, module: bool):
        super().__init__()
        self.module = module
        self.a, self.b, self.cos = nn.Linear(6, 8), nn.Linear(6, 8), nn.CosineSimilarity(dim=-1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.cos(a, b) if self.module else F.cosine_similarity(a, b, dim=-1)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("module", [False, True])
def test_cosine_similarity_reduces_its_dim_exactly(capture, module):
    """Dead channels (zero in both inputs) add nothing to the dot product nor to either norm:
    the oracle, which zeroes them in a copy, finds the pruned outputs equal."""
    x = _seeded(4, 6)
    report = graphprune.analyze(Cosine(module).eval(), x, capture=capture)
    group = group_of(report, "a.weight", 0)
    assert group is group_of(report, "b.weight", 0) and group.prunable and group.exact
    _oracle(Cosine(module).eval(), x, capture, groups=1)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fa, self.fb, self.c, self.d = nn.Linear(6, 4), nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(4, 2)

    def forward(self, x):
        o = torch.outer(self.fa(x[0]), self.fb(x[1]))
        return self.d(self.c(o).T)


@pytest.mark.parametrize("capture", CAPTURES)
def test_outer_keeps_rows_and_columns_apart(capture):
    x = _seeded(2, 6)
    report = graphprune.analyze(Outer().eval(), x, capture=capture)
    assert group_of(report, "fa.weight", 0) is group_of(report, "d.weight", 1)
    assert group_of(report, "fb.weight", 0) is group_of(report, "c.weight", 1)
    _oracle(Outer().eval(), x, capture, groups=2)


# ----- complex rotary embeddings
class ComplexRotary(nn.Module):
    """Meta's Llama attention: q and k rotated as complex numbers, ``view_as_complex(x.float()
    .reshape(*x.shape[:-1], -1, 2)) * freqs_cis``, back with ``view_as_real(...).flatten(3)``
    (``meta``; torch.fx cannot spread a shape, so the other form unflattens)."""

    def __init__(self, meta: bool, dim: int = 16, num_heads: int = 2, seq: int = 5):
        super().__init__()
        self.meta, self.num_heads, self.head_dim = meta, num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        freqs = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(seq).float(), freqs)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles))

    def rotate(self, x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2) if self.meta else x.float().unflatten(-1, (-1, 2))
        rotated = torch.view_as_complex(pairs)
        rotated = rotated * self.freqs_cis.view(1, x.shape[1], 1, rotated.shape[-1])
        return torch.view_as_real(rotated).flatten(3).type_as(x)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (w(x).view(B, N, self.num_heads, self.head_dim) for w in (self.wq, self.wk, self.wv))
        q, k, v = self.rotate(q).transpose(1, 2), self.rotate(k).transpose(1, 2), v.transpose(1, 2)
        attention = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
        return self.wo((attention @ v).transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("capture, meta", [("export", True), ("export", False), ("fx", False)])
def test_complex_rotary_embeddings_prune_whole_pairs(capture, meta):
    x = _seeded(2, 5, 16)
    group = group_of(graphprune.analyze(ComplexRotary(meta).eval(), x, capture=capture), "wq.weight", 0)
    assert group.prunable and group.size == 4  # pairs (2j, 2j + 1) of head_dim, as freqs_cis's columns
    assert maps(group)[("wq.weight", 0)] == np.repeat(np.arange(4), 2).tolist() * 2
    assert maps(group)[("freqs_cis", 1)] == list(range(4))
    model = ComplexRotary(meta).eval()
    _oracle(model, x, capture, groups=1)
    assert model.freqs_cis.shape[1] * 2 == model.head_dim < 8


# ----- reshape_as under torch.export, and sizes computed from shapes
class LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: a BatchNorm1d over the flattened tokens, then ``reshape_as``."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.out(self.bn(h.flatten(0, 1)).reshape_as(h).relu())


@pytest.mark.parametrize("capture", CAPTURES)
def test_reshape_as(capture):
    x = _seeded(2, 3, 6)
    report = graphprune.analyze(LinearNorm().eval(), x, capture=capture)
    group = group_of(report, "fc.weight", 0)
    assert group.prunable and group is group_of(report, "bn.weight", 0) is group_of(report, "out.weight", 1)
    _oracle(LinearNorm().eval(), x, capture, groups=1)


class Sequence(nn.Module):
    """A conv map read as a sequence (CRNN): channels merged with the height, sized ``c * h``."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4, 5)

    def forward(self, x):
        h = self.conv(x).relu()
        b, c, height, w = h.shape
        if self.form == "view":
            sequence = h.view(b, c * height, w).permute(2, 0, 1)
        elif self.form == "permuted":
            sequence = h.permute(3, 0, 1, 2).reshape(w, b, c * height)
        else:  # flattened whole (a product of three sizes), then split again
            sequence = h.reshape(b, c * height * w).view(b, c * height, w).transpose(1, 2)
        return self.fc(sequence)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("form", ["view", "permuted", "flat"])
def test_a_size_computed_as_a_product_of_shape_values_follows_the_pruning(capture, form):
    x = _seeded(2, 3, 4, 6)
    group = group_of(graphprune.analyze(Sequence(form).eval(), x, capture=capture), "conv.weight", 0)
    assert group.prunable and not (capture == "fx" and group.assumptions)  # under fx, read off the shape
    assert maps(group)[("fc.weight", 1)] == np.repeat(np.arange(8), 4).tolist()
    model = Sequence(form).eval()
    _oracle(model, x, capture, groups=1)
    assert model.fc.in_features == 4 * model.conv.out_channels < 32


class LiteralFactor(Sequence):
    def forward(self, x):
        h = self.conv(x).relu()
        b, c, _, w = h.shape
        return self.fc(h.view(b, c * 4, w).transpose(1, 2))  # 4: the height, written as a number


def test_a_product_with_a_literal_blocks_under_fx():
    """A literal factor may be an attribute the pruning changes: nothing says it stays."""
    group = group_of(graphprune.analyze(LiteralFactor("view").eval(), _seeded(2, 3, 4, 6), capture="fx"), "conv.weight", 0)
    assert not group.prunable and "a target size that no tensor's shape gives" in str(group.blocked)


class _ChannelPooling(nn.Module):
    """CBAM's spatial attention: the max (and mean) over channels weighs every position; with
    ``positions`` the channel where the max lies is read too (a channel number)."""

    def __init__(self, positions: bool = False):
        super().__init__()
        self.positions = positions
        self.a, self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(2, 1, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        top = torch.max(y, dim=1, keepdim=True)
        pooled = torch.cat([y.mean(dim=1, keepdim=True), top[0]], dim=1)
        out = self.head(y * self.conv(pooled).sigmoid())
        return out + top[1].float() if self.positions else out


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_max_over_channels_prunes_approximately_and_its_positions_block(capture):
    group = group_of(graphprune.analyze(_ChannelPooling().eval(), _seeded(2, 3, 8, 8), capture=capture), "a.weight", 0)
    assert group.prunable and not group.exact and any("max" in note for note in group.notes), group.notes
    model = _ChannelPooling().eval()
    graphprune.prune(model, 0.5, _seeded(2, 3, 8, 8), capture=capture)
    assert model.a.out_channels == 4 and model(_seeded(2, 3, 8, 8)).shape == (2, 4, 8, 8)
    report = graphprune.analyze(_ChannelPooling(positions=True).eval(), _seeded(2, 3, 8, 8), capture=capture)
    group = group_of(report, "a.weight", 0)
    assert not group.prunable and any("finds positions" in reason for reason in group.blocked), group.blocked
