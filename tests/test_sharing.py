"""Shared modules and tied parameters are pruned consistently."""
import torch
from torch import nn

import graphprune
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


def test_tied_weights_stay_tied():
    torch.manual_seed(0)
    model = TiedEmbedding().eval()
    tokens = torch.randint(0, 50, (2, 6))
    report = graphprune.analyze(model, tokens)
    width = next(g for g in report.groups if "embed" in g.layers() and g.size == 16)
    assert {"embed", "mix", "lm_head"} <= set(width.layers())
    assert dead_channel_oracle(TiedEmbedding().eval(), tokens)["groups_tested"] >= 1
    graphprune.prune(model, 0.5, tokens)
    assert model.lm_head.weight is model.embed.weight
    assert model.embed.weight.shape == (50, 8) and model.embed.embedding_dim == 8
    assert model(tokens).shape == (2, 6, 50)
