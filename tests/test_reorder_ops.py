"""Ops that reorder, sample or accumulate positions along a dim (flip, roll, channel_shuffle,
cumsum, unfold / fold, grid_sample) and a few more elementwise ones (sign, nan_to_num, lerp,
addcmul), each proven by the dead-channel oracle under both front-ends; a dim they shift or
accumulate blocks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import group_of
from oracle import dead_channel_oracle
from torch import nn

import graphprune

CAPTURES = ["fx", "export"]
X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
GRID = torch.rand(2, 5, 6, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1


class Between(nn.Module):
    """``op`` between a conv making 8 channels and one reading ``width`` of them."""

    def __init__(self, op, width: int = 8, extra: nn.Module = None):
        super().__init__()
        self.op, self.extra = op, extra
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(width, 4, 1)

    def forward(self, x):
        return self.b(self.op(self, F.relu(self.a(x))))


class Sampled(Between):
    """A conv's map sampled at the points of a grid the model is given."""

    def __init__(self):
        super().__init__(None)

    def forward(self, x, grid):
        return self.b(F.grid_sample(F.relu(self.a(x)), grid, align_corners=False))


EXACT = {
    "flip_channels": lambda m, y: torch.flip(y, dims=[1, 3]),
    "roll_spatial": lambda m, y: torch.roll(y, shifts=(1, -2), dims=(2, 3)),
    "cumsum_spatial": lambda m, y: torch.cumsum(y, dim=2) / 8,
    "channel_shuffle": lambda m, y: F.channel_shuffle(y, 2),
    "channel_shuffle_module": lambda m, y: m.extra(y),
    "elementwise": lambda m, y: torch.addcmul(torch.lerp(y, torch.sign(y), 0.3), y, torch.nan_to_num(y), value=0.5),
    "unfold_fold": lambda m, y: F.fold(F.unfold(y, 2, stride=2) * 2, (8, 8), 2, stride=2),
}


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("kind", sorted(EXACT))
def test_reordered_channels_prune_exactly(kind, capture):
    extra = nn.ChannelShuffle(4) if kind == "channel_shuffle_module" else None
    make = lambda: Between(EXACT[kind], extra=extra)  # noqa: E731
    group = group_of(graphprune.analyze(make().eval(), X, capture=capture), "a.weight", 0)
    assert group.prunable and group.exact
    summary = dead_channel_oracle(make(), X, capture=capture, fraction=0.5)
    assert summary["groups_tested"] == 1 and summary["params_after"] < summary["params_before"]


def test_a_channel_shuffle_keeps_as_many_channels_in_every_group():
    report = graphprune.analyze(Between(EXACT["channel_shuffle"]).eval(), X)
    maps = {m.name: m.index_map for m in group_of(report, "a.weight", 0).members}
    assert list(maps["a.weight"]) == [0, 1, 2, 3, 0, 1, 2, 3]  # the d-th channel of both groups: one unit
    assert list(maps["b.weight"]) == [0, 0, 1, 1, 2, 2, 3, 3]  # transposed: (group 0, 1) for each d
    model = Between(EXACT["channel_shuffle"]).eval()
    graphprune.prune(model, 0.5, X)
    assert model.a.out_channels == 4 and model(X).shape == (2, 4, 8, 8)


class Patches(nn.Module):
    """ViT-style patches by unfold: (N, C·k, L) read by a Linear over C·k."""

    def __init__(self):
        super().__init__()
        self.a, self.proj = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4, 6)

    def forward(self, x):
        return self.proj(F.unfold(F.relu(self.a(x)), 2, stride=2).transpose(1, 2))


@pytest.mark.parametrize("capture", CAPTURES)
def test_unfold_gives_each_channel_its_kernel_positions(capture):
    group = group_of(graphprune.analyze(Patches().eval(), X, capture=capture), "a.weight", 0)
    assert list({m.name: m for m in group.members}["proj.weight"].index_map[:8]) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert dead_channel_oracle(Patches(), X, capture=capture)["groups_tested"] == 1


@pytest.mark.parametrize("capture", CAPTURES)
def test_grid_sample_passes_channels_and_takes_the_grids_positions(capture):
    report = graphprune.analyze(Sampled().eval(), (X, GRID), capture=capture)
    assert group_of(report, "a.weight", 0).prunable
    summary = dead_channel_oracle(Sampled(), (X, GRID), capture=capture)
    assert summary["groups_tested"] == 1
    model = Sampled().eval()
    graphprune.prune(model, 0.5, (X, GRID), capture=capture)
    assert model(X, GRID).shape == (2, 4, 5, 6)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("op, phrase", [(lambda m, y: torch.roll(y, 1, dims=1), "rolls"),
                                        (lambda m, y: torch.cumsum(y, dim=1), "accumulates")])
def test_shifting_or_accumulating_the_channels_blocks_them(op, phrase, capture):
    group = group_of(graphprune.analyze(Between(op).eval(), X, capture=capture), "a.weight", 0)
    assert not group.prunable and any(phrase in reason for reason in group.blocked), group.blocked


class Metric(nn.Module):
    """A bilinear layer over two streams, distances between their positions, and a p-norm."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(6, 8), nn.Linear(6, 10)
        self.bil, self.head = nn.Bilinear(8, 10, 7), nn.Linear(7, 3)

    def forward(self, x):
        u, v = F.relu(self.a(x)), F.relu(self.c(x))
        near = torch.cdist(u, u).mean(-1, keepdim=True) / torch.norm(v, dim=-1, keepdim=True).clamp(min=1)
        return self.head(F.relu(self.bil(u, v)) * near + v.norm(p=2, dim=-1, keepdim=True))


@pytest.mark.parametrize("capture", CAPTURES)
def test_bilinear_cdist_and_norms_prune_exactly(capture):
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(2))
    report = graphprune.analyze(Metric().eval(), x, capture=capture)
    for name in ("a.weight", "c.weight", "bil.weight"):
        assert group_of(report, name, 0).prunable and group_of(report, name, 0).exact, name
    assert dead_channel_oracle(Metric(), x, capture=capture, fraction=0.4)["groups_tested"] == 3


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_product_over_the_channels_blocks_them(capture):
    op = lambda m, y: y * y.abs().add(1).prod(dim=1, keepdim=True)  # noqa: E731
    group = group_of(graphprune.analyze(Between(op).eval(), X, capture=capture), "a.weight", 0)
    assert not group.prunable and any("multiplies" in reason for reason in group.blocked), group.blocked
