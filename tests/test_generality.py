"""Self-written models reproducing the failure classes found on timm, without timm:
a module called twice (fx names its second call ``cpe@1``), a repeat count computed from a
shape, and split sizes held in attributes (fasternet's partial convolution)."""
from __future__ import annotations

import torch
from torch import nn

import graphprune
from conftest import group_of, run_oracle

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
