"""graphprune.sensitivity: per-group pruning on copies, exact w.r.t. prune(), ratios_for, plot."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import graphprune
from graphprune.workflow.sensitivity import SensitivityResult, group_keys

from conftest import state_snapshot, assert_same_state


class Net(nn.Module):
    """conv-bn-relu x 3 with a residual add between the last two, then a classifier: two prunable
    groups, conv1's channels and the shared channels of conv2 / conv3."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 12, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(12)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        y = torch.relu(self.bn3(self.conv3(y)) + y)
        return self.fc(self.pool(y).flatten(1))


def make_net():
    net = Net()
    with torch.no_grad():  # non-trivial norm statistics so that every channel matters
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def fidelity(reference: nn.Module):
    """eval_fn: minus the mean absolute change of the logits on X (0 for the unpruned model)."""
    with torch.no_grad():
        target = reference(X)

    def eval_fn(model):
        model.eval()
        with torch.no_grad():
            return -float((model(X) - target).abs().mean())

    return eval_fn


def test_sensitivity_table_and_baseline():
    net = make_net()
    snapshot = state_snapshot(net)
    report = graphprune.analyze(net, X[:1])
    result = graphprune.sensitivity(net, X[:1], fidelity(net), ratios=(0.25, 0.5), progress=False)
    assert_same_state(net, snapshot)  # the model itself is never pruned
    assert isinstance(result, SensitivityResult)
    assert result.baseline == 0.0 and result.ratios == (0.25, 0.5)
    prunable = [g.id for g in report.prunable_groups]
    assert result.groups == prunable and len(result.table) == 2 * len(prunable)
    for row in result.table:
        assert row["removed"] == math.floor(row["ratio"] * row["channels"])
        assert row["drop"] == pytest.approx(result.baseline - row["metric"])
        assert row["drop"] > 0  # removing real channels changes the logits
    for group in prunable:  # more pruning hurts more on this model
        small, large = result.rows_of(group)
        assert large["drop"] > small["drop"]
    keys = [row["key"] for row in result.table]
    assert set(keys) == {"conv1", "conv2"}  # conv3 shares conv2's group
    text = str(result)
    assert "baseline 0;" in text and "r=0.25" in text and "conv2" in text


def test_rows_match_prune_with_the_derived_mapping_exactly():
    net = make_net()
    eval_fn = fidelity(net)
    result = graphprune.sensitivity(net, X[:1], eval_fn, ratios=(0.3, 0.6), criterion="l2", progress=False)
    for row in result.table:
        pruned = graphprune.prune(net, {row["key"]: row["ratio"]}, X[:1], criterion="l2", inplace=False)
        assert eval_fn(pruned) == row["metric"]  # the same channels were removed
        assert graphprune.count_parameters(pruned) < graphprune.count_parameters(net)


def test_ratios_for_derives_a_mapping_prune_accepts():
    net = make_net()
    result = graphprune.sensitivity(net, X[:1], fidelity(net), ratios=(0.25, 0.5, 0.75), progress=False)
    drops = {(r["group"], r["ratio"]): r["drop"] for r in result.table}
    keys = group_keys(graphprune.analyze(net, X[:1]).groups)
    # a threshold between the two smallest drops of one group
    group = result.groups[0]
    limit = (drops[(group, 0.25)] + drops[(group, 0.5)]) / 2
    mapping = result.ratios_for(limit)
    assert set(mapping) == set(keys.values())
    for gid, key in keys.items():
        allowed = [r for r in result.ratios if drops[(gid, r)] <= limit]
        assert mapping[key] == (max(allowed) if allowed else 0.0)
    assert result.ratios_for(limit, conservative=True)[keys[group]] == 0.25
    assert result.ratios_for(-1.0) == {key: 0.0 for key in keys.values()}
    assert result.ratios_for(float("inf")) == {key: 0.75 for key in keys.values()}

    pruned = graphprune.prune(net, mapping, X[:1], inplace=False)
    sizes = {"conv1": 8, "conv2": 12}
    expected = {key: sizes[key] - math.floor(ratio * sizes[key]) for key, ratio in mapping.items()}
    assert pruned.conv1.out_channels == expected["conv1"]
    assert pruned.conv2.out_channels == pruned.conv3.out_channels == pruned.fc.in_features == expected["conv2"]
    with pytest.raises(TypeError, match="max_drop must be a real number"):
        result.ratios_for("0.1")


def test_ratios_for_conservative_stops_at_the_first_failure():
    result = SensitivityResult(1.0, (0.1, 0.3, 0.5), criterion="l1")
    for ratio, drop in ((0.1, 0.0), (0.3, 0.2), (0.5, 0.01)):  # noisy: the largest ratio looks fine
        result.table.append({"group": 4, "key": "layer", "root": "layer", "layers": ["layer"], "channels": 10,
                             "ratio": ratio, "removed": 1, "metric": 1 - drop, "drop": drop, "note": ""})
    assert result.ratios_for(0.05) == {"layer": 0.5}
    assert result.ratios_for(0.05, conservative=True) == {"layer": 0.1}


def test_group_selection_and_validation():
    net = make_net()
    report = graphprune.analyze(net, X[:1])
    conv2_group = next(g for g in report.prunable_groups if g.root == "conv2")
    by_name = graphprune.sensitivity(net, X[:1], fidelity(net), ratios=[0.5], groups=["conv3"], progress=False)
    assert by_name.groups == [conv2_group.id]  # conv3 produces the channels of conv2's group
    by_id = graphprune.sensitivity(net, X[:1], fidelity(net), ratios=[0.5], groups=[conv2_group.id],
                                   progress=False)
    assert by_id.table[0]["metric"] == by_name.table[0]["metric"]
    blocked = report.blocked_groups[0]
    with pytest.raises(ValueError, match="is not prunable"):
        graphprune.sensitivity(net, X[:1], fidelity(net), groups=[blocked.id], progress=False)
    with pytest.raises(ValueError, match="name no prunable group"):
        graphprune.sensitivity(net, X[:1], fidelity(net), groups=["nothing*"], progress=False)
    with pytest.raises(ValueError, match=r"every ratio must lie in \(0, 1\)"):
        graphprune.sensitivity(net, X[:1], fidelity(net), ratios=(0.5, 1.0), progress=False)
    with pytest.raises(ValueError, match="ratios is empty"):
        graphprune.sensitivity(net, X[:1], fidelity(net), ratios=(), progress=False)
    with pytest.raises(TypeError, match="eval_fn must be callable"):
        graphprune.sensitivity(net, X[:1], 3, progress=False)
    with pytest.raises(TypeError, match="eval_fn must return a real number"):
        graphprune.sensitivity(net, X[:1], lambda m: "good", progress=False)
    with pytest.raises(TypeError, match="verify must be True or False"):
        graphprune.sensitivity(net, X[:1], fidelity(net), verify="yes", progress=False)


def test_small_ratio_removes_nothing_and_is_not_evaluated():
    net = make_net()
    calls = []

    def eval_fn(model):
        calls.append(model)
        return 1.0

    result = graphprune.sensitivity(net, X[:1], eval_fn, ratios=(0.05,), progress=False)
    assert len(calls) == 1  # only the baseline: floor(0.05 * 12) == 0 everywhere
    assert all(row["removed"] == 0 and row["drop"] == 0.0 for row in result.table)


def test_plot_writes_a_png(tmp_path):
    import matplotlib.image

    net = make_net()
    result = graphprune.sensitivity(net, X[:1], fidelity(net), ratios=(0.25, 0.5), progress=False)
    path = result.plot(str(tmp_path / "sensitivity.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # not blank
    result.plot(str(tmp_path / "drop.png"), metric="drop")
    with pytest.raises(ValueError, match="metric must be"):
        result.plot(str(tmp_path / "x.png"), metric="loss")
    assert result.to_dict()["table"][0]["group"] == result.table[0]["group"]


def test_resnet20_groups_have_unique_keys():
    model = graphprune.models.get_model("resnet20")
    report = graphprune.analyze(model, torch.randn(1, 3, 32, 32))
    keys = group_keys(report.groups)
    assert set(keys) == {g.id for g in report.prunable_groups}
    assert len(set(keys.values())) == len(keys)
    block = next(g for g in report.prunable_groups if g.root == "layer1.0.conv1")
    assert keys[block.id] == "layer1.0.conv1"
    stem = next(g for g in report.prunable_groups if g.root == "conv1")  # conv1 + every stage-1 conv2
    assert keys[stem.id] == "conv1"
