"""A layer the traced forward never calls may still run: in training (an auxiliary head,
GoogLeNet's and Inception's), or on other inputs. Nothing says which channels it reads, so
every group as wide as its parameters is blocked, and the pruned model still trains. A layer
never called, in training either, is unused and blocks nothing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import group_of
from torch import nn

import graphprune

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class AuxHead(nn.Module):
    """A classifier with an auxiliary head that only training runs; ``unused`` adds a layer
    nothing calls; ``needs_targets`` makes training mode ask for more than the inputs."""

    def __init__(self, needs_targets: bool = False):
        super().__init__()
        self.needs_targets = needs_targets
        self.stem, self.body = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 24, 3, padding=1)
        self.norm = nn.BatchNorm2d(16)
        self.head, self.aux = nn.Linear(24, 5), nn.Linear(16, 5)
        self.unused = nn.Linear(24, 7)

    def forward(self, x, targets=None):
        f = F.relu(self.norm(self.stem(x)))
        logits = self.head(F.adaptive_avg_pool2d(F.relu(self.body(f)), 1).flatten(1))
        if self.training:
            if self.needs_targets and targets is None:
                raise ValueError("training needs targets")
            return logits, self.aux(F.dropout(F.adaptive_avg_pool2d(f, 1).flatten(1), 0.5))
        return logits


@pytest.mark.parametrize("needs_targets", [False, True])
def test_a_branch_only_training_runs_blocks_the_channels_it_may_read(needs_targets):
    model = AuxHead(needs_targets).eval()
    report = graphprune.analyze(model, X)
    read_by_aux = group_of(report, "stem.weight", 0)
    assert not read_by_aux.prunable
    assert any("aux (Linear)" in reason for reason in read_by_aux.blocked), read_by_aux.blocked
    # the unused layer is 24 wide, as body is: it blocks body only when training cannot run
    assert group_of(report, "body.weight", 0).prunable is not needs_targets
    if needs_targets:  # every group of this small model is as wide as aux or unused
        with pytest.warns(UserWarning, match="ERROR: no prunable channel group"):
            graphprune.prune(model, 0.5, X)
    else:
        graphprune.prune(model, 0.5, X)
    model.train()
    if not needs_targets:
        logits, aux = model(X)
        (logits.sum() + aux.sum()).backward()
    assert model.stem.out_channels == 16


def test_the_training_run_leaves_the_model_and_the_random_state_as_they_were():
    model = AuxHead().eval()  # training runs its BatchNorm's statistics and a dropout
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    graphprune.analyze(model, X)
    assert torch.equal(torch.rand(1), expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())
