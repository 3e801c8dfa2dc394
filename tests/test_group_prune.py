"""Group.prune: pruning chosen channels of one group, validated, and pruning a pruned model again."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphprune
from small_net import assert_consistent, small_net, widths
from conftest import assert_same_state, group_of, state_snapshot

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- Group.prune
def test_group_prune_with_explicit_indices():
    model = small_net()
    before = state_snapshot(model)
    report = graphprune.analyze(model, X)
    stream = group_of(report, "conv1.weight", 0)
    inner = group_of(report, "conva.weight", 0)
    assert (stream.size, inner.size) == (16, 12)

    stream.prune([0, 5, 15])
    keep = [i for i in range(16) if i not in (0, 5, 15)]
    assert torch.equal(model.conv1.weight, before["conv1.weight"][keep])
    for key in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bnb.running_mean"):
        assert torch.equal(model.get_parameter(key) if "running" not in key else model.get_buffer(key), before[key][keep])
    assert torch.equal(model.conva.weight, before["conva.weight"][:, keep])
    assert torch.equal(model.convb.weight, before["convb.weight"][keep])
    assert torch.equal(model.conv3.weight, before["conv3.weight"][:, keep])
    assert widths(model) == (13, 12, 24)
    assert_consistent(model)

    # A second group of the same analysis: removals accumulate on shared tensors.
    inner.prune(np.array([11, 2]))
    keep_inner = [i for i in range(12) if i not in (2, 11)]
    assert torch.equal(model.conva.weight, before["conva.weight"][keep_inner][:, keep])
    assert torch.equal(model.convb.weight, before["convb.weight"][keep][:, keep_inner])
    assert widths(model) == (13, 10, 24)
    assert_consistent(model)
    with torch.no_grad():
        assert model(X).shape == (2, 10)

    with pytest.raises(ValueError, match=r"group \d+ was already pruned; run analyze\(\) again"):
        stream.prune([1])


@pytest.mark.parametrize(
    "indices, message",
    [
        ([12], r"channel indices for group \d+ must lie in \[0, 12\); got 12\.\.12"),
        ([0, -1], r"must lie in \[0, 12\); got -1\.\.0"),
        ([3, 4, 3], r"channel indices for group \d+ contain duplicates"),
        (list(range(12)), r"cannot remove all 12 channels of group \d+ \(conva\)"),
    ],
)
def test_group_prune_rejects_bad_indices(indices, message):
    model = small_net()
    snapshot = state_snapshot(model)
    inner = group_of(graphprune.analyze(model, X), "conva.weight", 0)
    with pytest.raises(ValueError, match=message):
        inner.prune(indices)
    assert_same_state(model, snapshot)
    inner.prune([0])  # still usable afterwards
    assert model.conva.out_channels == 11


@pytest.mark.parametrize("indices", [[1.7], np.array([0.5, 3.2])], ids=["list", "array"])
def test_group_prune_rejects_non_integer_indices(indices):
    model = small_net()
    snapshot = state_snapshot(model)
    inner = group_of(graphprune.analyze(model, X), "conva.weight", 0)
    with pytest.raises((TypeError, ValueError), match="integer"):
        inner.prune(indices)  # silently truncating 1.7 to channel 1 would remove the wrong channel
    assert_same_state(model, snapshot)


def test_pruning_a_pruned_model_again():
    model = small_net()
    graphprune.prune(model, 0.5, X)
    graphprune.prune(model, 0.5, X)
    assert widths(model) == (4, 3, 6)
    assert_consistent(model)
    with torch.no_grad():
        assert model(X).shape == (2, 10)


def test_group_prune_refuses_blocked_groups_and_ignores_empty_plans():
    model = small_net()
    snapshot = state_snapshot(model)
    report = graphprune.analyze(model, X)
    head = group_of(report, "fc.weight", 0)
    assert head.blocked == ["reaches output"]
    with pytest.raises(ValueError, match=r"is blocked: reaches output"):
        head.prune([0])
    group_of(report, "conva.weight", 0).prune([])
    assert_same_state(model, snapshot)


class TwoBranchConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


def test_group_prune_refuses_to_empty_one_member_and_names_it():
    model = TwoBranchConcat().eval()
    snapshot = state_snapshot(model)
    group = group_of(graphprune.analyze(model, X), "a.weight", 0)
    a_channels = sorted(set(next(m for m in group.members if m.name == "a.weight").index_map.tolist()))
    # a.bias shares a.weight's channels and comes after it: the message names the first member
    with pytest.raises(ValueError, match=r"would empty a\.weight \(dim 0\)"):
        group.prune(a_channels)
    assert_same_state(model, snapshot)


def test_group_prune_refuses_a_report_older_than_the_model():
    """A report taken before the model changed (pruned by prune(), or a layer replaced) must
    not prune the model it no longer describes."""
    model = small_net()
    x = torch.randn(1, 3, 16, 16)
    stale = graphprune.analyze(model, x)
    graphprune.prune(model, 0.25, x)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="changed since it was analysed"):
        stale.prunable_groups[0].prune([0])
    assert_same_state(model, before)
    report = graphprune.analyze(model, x)  # pruning groups of one report, one after another, is fine
    first, second = report.prunable_groups[:2]
    first.prune([0])
    second.prune([0])
    assert_consistent(model)


def test_group_prune_audits_the_pruned_model(monkeypatch):
    """A group whose pruning would break the model (here: a buffer the surgery skips) is
    refused and blocked with the audit's reason, and the model restored."""
    import graphprune.pruning.surgery as surgery

    model = small_net()
    skip, shrink = model.bna.running_var, surgery._Transaction.shrink
    monkeypatch.setattr(surgery._Transaction, "shrink", lambda self, t, keep: None if t is skip else shrink(self, t, keep))
    report = graphprune.analyze(model, torch.randn(1, 3, 16, 16))
    group = group_of(report, "conva.weight", 0)
    before = state_snapshot(model)
    with pytest.raises(graphprune.PruningError, match="no longer runs on the example inputs"):
        group.prune([0, 1])
    assert_same_state(model, before)
    assert group.blocked and group.blocked[-1].startswith("shape audit:")
