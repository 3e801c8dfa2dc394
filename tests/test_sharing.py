"""Shared modules and tied parameters are pruned consistently."""
import torch
from torch import nn

import graphprune
from conftest import group_of
from oracle import dead_channel_oracle


class CalledTwice(nn.Module):
    """One conv applied to two branches: both branches' channels are the same group."""

    def __init__(self):
        super().__init__()
        self.stem_a, self.stem_b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)
        self.shared = nn.Conv2d(8, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.shared(self.stem_a(x)) + self.shared(self.stem_b(x)))


class TiedEmbedding(nn.Module):
    """A language-model head whose weight is the embedding matrix."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mix = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        return self.lm_head(torch.relu(self.mix(self.embed(tokens))))


def test_module_called_twice_couples_its_inputs():
    model = CalledTwice().eval()
    report = graphprune.analyze(model, torch.randn(1, 3, 16, 16))
    group = next(g for g in report.prunable_groups if g.root == "stem_a")
    assert {"stem_a", "stem_b", "shared"} <= set(group.layers())
    assert dead_channel_oracle(CalledTwice().eval(), torch.randn(1, 3, 16, 16))["groups_tested"] == 2
    graphprune.prune(model, 0.5, torch.randn(1, 3, 16, 16))
    assert model.stem_a.out_channels == model.stem_b.out_channels == model.shared.in_channels == 4


def test_tied_weights_couple_both_uses_and_stay_tied():
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    model = TiedEmbedding().eval()
    report = graphprune.analyze(model, tokens)
    hidden = group_of(report, "embed.weight", 1)
    # The embedding's width is both mix's input and, through the tied weight, lm_head's
    # input: so mix's input and output widths are one group.
    assert hidden.size == 16 and hidden.prunable
    assert {(m.name, m.dim) for m in hidden.members} == {
        ("embed.weight", 1), ("mix.weight", 0), ("mix.weight", 1), ("mix.bias", 0)}
    assert group_of(report, "embed.weight", 0).blocked == ["reaches output"]
    # The tied dim is a producer and a consumer at once: zero it as a producer too.
    assert dead_channel_oracle(TiedEmbedding().eval(), tokens, seed=0, zero_producers=True)["groups_tested"] == 1
    graphprune.prune(model, 0.5, tokens)
    assert model.lm_head.weight is model.embed.weight
    assert model.embed.weight.shape == (50, 8)
    assert model.embed.embedding_dim == model.lm_head.in_features == model.mix.in_features == model.mix.out_features == 8
    assert model(tokens).shape == (2, 6, 50)
