"""graphprune.report: parameters, FLOPs, latency before/after and per-group widths."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import graphprune
from graphprune.workflow.compare import Comparison, group_widths

X = torch.randn(1, 3, 8, 8)


def vgg_like() -> nn.Module:
    """conv -> bn -> relu -> conv -> flatten -> linear: the last group reaches the Linear through a
    flatten, 16 positions per channel."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 5),
    ).eval()


def test_report_counts_and_ratios():
    before = vgg_like()
    after = graphprune.prune(before, 0.5, X, inplace=False)
    comparison = graphprune.report(before, after, X, latency=False)
    assert isinstance(comparison, Comparison)
    assert comparison.parameters == (graphprune.count_parameters(before), graphprune.count_parameters(after))
    assert comparison.flops == (graphprune.count_flops(before, X), graphprune.count_flops(after, X))
    assert comparison.ratio("parameters") == pytest.approx(comparison.parameters[1] / comparison.parameters[0])
    assert 0 < comparison.ratio("flops") < 0.6
    assert comparison.latency is None and comparison.speedup is None and comparison.ratio("latency") is None
    rows = {row["root"]: row for row in comparison.groups if row["status"] == "prunable"}
    assert rows["0"]["before"] == 8 and rows["0"]["after"] == 4 and rows["0"]["kept"] == 0.5
    assert rows["3"]["before"] == 12 and rows["3"]["after"] == 6  # read through the flatten as well
    blocked = [row for row in comparison.groups if row["status"] == "blocked"]
    assert blocked and all(row["after"] == row["before"] for row in blocked)
    with pytest.raises(ValueError, match="metric must be"):
        comparison.ratio("memory")


def test_report_text_and_json():
    before = vgg_like()
    after = graphprune.prune(before, 0.25, X, inplace=False)
    comparison = graphprune.report(before, after, X, latency=False)
    text = str(comparison)
    assert text.splitlines()[0] == "graphprune comparison of Sequential (input: tensor(1, 3, 8, 8))"
    assert "parameters" in text and "FLOPs" in text and "latency" not in text
    assert f"{comparison.parameters[0]:,}" in text and f"{comparison.parameters[1]:,}" in text
    assert "channel groups" in text
    data = json.loads(comparison.to_json())
    assert data == comparison.to_dict()
    assert data["parameters"] == {"before": comparison.parameters[0], "after": comparison.parameters[1],
                                  "ratio": comparison.ratio("parameters")}
    assert data["latency"] is None and len(data["groups"]) == len(comparison.groups)


def test_report_measures_latency():
    before = vgg_like()
    after = graphprune.prune(before, 0.5, X, inplace=False)
    comparison = graphprune.report(before, after, X, repeats=3, warmup=1, groups=False)
    assert comparison.groups == []
    b, a = comparison.latency
    assert b > 0 and a > 0
    assert comparison.speedup == pytest.approx(b / a)
    assert "latency (ms)" in str(comparison) and "speed-up" in str(comparison)


def test_unpruned_comparison_and_resnet_groups():
    model = graphprune.models.get_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    same = graphprune.report(model, model, x, latency=False)
    assert same.ratio("parameters") == 1.0 and same.ratio("flops") == 1.0
    assert all(row["after"] == row["before"] for row in same.groups)
    pruned = graphprune.prune(model, {"layer1.0.conv1": 0.5}, x, inplace=False)
    widths = group_widths(graphprune.analyze(model, x).groups, pruned)
    changed = {gid: w for gid, w in widths.items() if w != graphprune.analyze(model, x).groups[gid].size}
    assert list(changed.values()) == [8]


def test_report_validates():
    model = vgg_like()
    with pytest.raises(TypeError, match="model_after must be a torch.nn.Module"):
        graphprune.report(model, "pruned", X)
    with pytest.raises(TypeError, match="latency must be True or False"):
        graphprune.report(model, model, X, latency="no")
    with pytest.raises(TypeError, match="repeats must be an integer"):
        graphprune.report(model, model, X, repeats="20")
    with pytest.raises(ValueError, match="warmup must be at least 0"):
        graphprune.report(model, model, X, warmup=-1)
