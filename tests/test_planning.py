"""Planning: per-layer ratios, global ranking, rounding, iterative steps and budgets."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from graphprune import criteria
import graphprune
import graphprune.reporting.measure
from graphprune.pruning.budget import BudgetWarning
from graphprune.pruning.run import PruneResult, kept_fraction, step_ratio
from graphprune.reporting.measure import count_flops, count_parameters
from graphprune.pruning.planner import plan_removal, removal_counts, repeated_groups, round_count, score_groups

X64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    """A small CNN with a residual add, so that one group spans several layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.block1 = nn.Conv2d(16, 32, 3, padding=1)
        self.block2 = nn.Conv2d(32, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.block2(torch.relu(self.block1(x)))
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


def sizes_by_root(model, inputs):
    return {g.root: g.size for g in graphprune.analyze(model, inputs).prunable_groups}


X8 = torch.randn(1, 3, 8, 8)


# ----- per-layer ratios
def test_ratio_mapping_by_name_and_glob():
    model = Net()
    before = sizes_by_root(model, X8)
    assert before == {"stem": 16, "block1": 32, "head": 24}
    graphprune.prune(model, {"block1": 0.5, "stem": 0.25, "b*": 0.75}, X8)
    assert sizes_by_root(model, X8) == {"stem": 12, "block1": 16, "head": 24}  # exact names beat the glob
    model = Net()
    graphprune.prune(model, {"block*": 0.5}, X8)  # block2 is a producer of the stem group
    assert sizes_by_root(model, X8) == {"stem": 8, "block1": 16, "head": 24}


def test_ratio_mapping_validation():
    with pytest.raises(ValueError, match=r"name no submodule of Net: \['nope\*'\]"):
        graphprune.prune(Net(), {"stem": 0.5, "nope*": 0.5}, X8)
    with pytest.raises(ValueError, match=r"ratio\['stem'\]: ratio must lie in \[0, 1\)"):
        graphprune.prune(Net(), {"stem": 1.0}, X8)
    with pytest.raises(TypeError, match="keys must be module names"):
        graphprune.prune(Net(), {3: 0.5}, X8)
    with pytest.raises(ValueError, match="mapping is empty"):
        graphprune.prune(Net(), {}, X8)
    with pytest.raises(ValueError, match="global_ranking needs a single float"):
        graphprune.prune(Net(), {"stem": 0.5}, X8, global_ranking=True)


def test_planning_argument_validation():
    with pytest.raises(ValueError, match="needs a ratio or a budget"):
        graphprune.prune(Net(), example_inputs=X8)
    with pytest.raises(ValueError, match="either ratio or target_flops"):
        graphprune.prune(Net(), 0.5, X8, target_flops=0.5)
    with pytest.raises(ValueError, match="at most one budget"):
        graphprune.prune(Net(), None, X8, target_flops=0.5, target_params=0.5)
    with pytest.raises(ValueError, match=r"target_params must lie in \(0, 1\]"):
        graphprune.prune(Net(), None, X8, target_params=0.0)
    with pytest.raises(TypeError, match="round_to must be an integer"):
        graphprune.prune(Net(), 0.5, X8, round_to=2.0)
    with pytest.raises(ValueError, match="round_to must be at least 1"):
        graphprune.prune(Net(), 0.5, X8, round_to=0)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        graphprune.prune(Net(), 0.5, X8, steps=0)
    with pytest.raises(ValueError, match=r"max_ratio must lie in \(0, 1\)"):
        graphprune.prune(Net(), 0.5, X8, global_ranking=True, max_ratio=1.0)
    with pytest.raises(ValueError, match="schedule must be"):
        graphprune.prune(Net(), 0.5, X8, steps=2, schedule="cosine")
    with pytest.raises(TypeError, match="global_ranking must be True or False"):
        graphprune.prune(Net(), 0.5, X8, global_ranking=1)


# ----- round_to
def test_round_count():
    assert round_count(64, 21, 8, 63) == 24  # 43 kept rounds to 40
    assert round_count(64, 19, 8, 63) == 16  # 45 kept rounds to 48
    assert round_count(10, 3, 8, 9) == 2  # keeps 8
    assert round_count(6, 3, 8, 5) == 0  # smaller than round_to: left alone
    assert round_count(64, 63, 8, 63) == 56  # keeps at least one multiple
    assert round_count(64, 40, 8, 20) == 16  # never past the cap (keep 48, not 24)


@pytest.mark.parametrize("global_ranking", [False, True])
def test_round_to_gives_multiples(global_ranking):
    model = torchvision.models.resnet18()
    graphprune.prune(model, 0.37, X64, round_to=8, global_ranking=global_ranking)
    sizes = sizes_by_root(model, X64)
    assert all(size % 8 == 0 for size in sizes.values()), sizes
    assert sum(sizes.values()) < 0.75 * 2 * (64 * 3 + 128 * 3 + 256 * 3 + 512 * 3) / 2


# ----- global ranking
def test_global_ranking_respects_max_ratio_and_never_empties_a_group():
    report = graphprune.analyze(torchvision.models.resnet18(), X64)
    scores = score_groups(report.groups, criteria.L1())
    unlucky = report.prunable_groups[3]
    scores[unlucky] = np.full(unlucky.size, 1e-9)  # every channel of one group looks useless
    scores[unlucky][0] = 1.0
    plan = plan_removal(report.groups, 0.5, scores=scores, global_ranking=True, max_ratio=0.6)
    assert len(plan[unlucky]) == math.floor(0.6 * unlucky.size)
    total = sum(g.size for g in report.prunable_groups)
    assert sum(len(v) for v in plan.values()) == math.floor(0.5 * total)
    for group, removed in plan.items():
        assert len(removed) <= math.floor(0.6 * group.size) and len(removed) < group.size
    # the highest ratio allowed: still no group emptied, every member keeps a channel
    plan = plan_removal(report.groups, 0.99, scores=scores, global_ranking=True, max_ratio=0.99)
    for group, removed in plan.items():
        assert len(removed) < group.size
        for m in group.members:
            assert not np.isin(m.index_map, removed).all()


def test_global_ranking_differs_from_uniform_and_prunes():
    model = torchvision.models.resnet18()
    before = sizes_by_root(model, X64)
    result = graphprune.prune(model, 0.4, X64, global_ranking=True, max_ratio=0.7, return_result=True)
    after = sizes_by_root(model, X64)
    removed = {root: before[root] - after[root] for root in before}
    assert sum(removed.values()) == math.floor(0.4 * sum(before.values()))
    assert all(removed[r] <= math.floor(0.7 * before[r]) for r in before)
    assert len({round(removed[r] / before[r], 2) for r in before}) > 1  # not uniform
    assert result.after["params"] < result.before["params"]


def test_uniform_prunes_a_group_repeated_layer_after_layer_alike():
    report = graphprune.analyze(torchvision.models.resnet18(), X64)
    scores = score_groups(report.groups, criteria.L1())
    classes = {tuple(g.root for g in c) for c in repeated_groups(report.prunable_groups)}
    assert ("layer1.0.conv1", "layer1.1.conv1") in classes and ("layer4.0.conv1", "layer4.1.conv1") in classes
    by_root = {g.root: g for g in report.prunable_groups}
    useless, twin = by_root["layer1.1.conv1"], by_root["layer1.0.conv1"]
    scores[useless] = np.full(useless.size, 1e-9)  # one layer looks useless: ranked alone, it loses more
    scores[useless][0] = 1.0
    total = sum(g.size for g in report.prunable_groups)
    free = plan_removal(report.groups, 0.4, scores=scores, global_ranking=True, max_ratio=0.8)
    assert len(free[useless]) > len(free.get(twin, ()))
    for kwargs in ({"global_ranking": True, "max_ratio": 0.8}, {}):
        plan = plan_removal(report.groups, 0.4, scores=scores, uniform=True, **kwargs)
        for repeated in repeated_groups(report.prunable_groups):
            assert len({len(plan.get(g, ())) for g in repeated}) == 1, [g.root for g in repeated]
        assert len(plan[useless]) == len(plan[twin]) > 0
        assert 0.3 * total < sum(map(len, plan.values())) <= math.floor(0.4 * total)
    # a group blocked in one layer leaves the group whole in every layer
    blocked = graphprune.analyze(torchvision.models.resnet18(), X64, ignored_layers=["layer2.1.conv1"])
    pruned = {g.root for g in plan_removal(blocked.groups, 0.4, criteria.L1(), uniform=True)}
    assert not pruned & {"layer2.0.conv1", "layer2.1.conv1"} and "layer3.0.conv1" in pruned


def test_removal_counts_uniform_and_mapping():
    report = graphprune.analyze(Net(), X8)
    scores = score_groups(report.groups, criteria.L1())
    counts = {g.root: c for g, c in removal_counts(scores, 0.3).items()}
    assert counts == {"stem": 4, "block1": 9, "head": 7}
    counts = {g.root: c for g, c in removal_counts(scores, {"head": 0.5}).items()}
    assert counts == {"head": 12}


# ----- iterative pruning
class CountingL1(criteria.L1):
    def __init__(self):
        super().__init__()
        self.prepared = []

    def prepare(self, model, report):
        self.prepared.append(sum(g.size for g in report.prunable_groups))


def test_schedules():
    assert kept_fraction(0.4, 1, 3, "linear") == pytest.approx(0.8)
    assert kept_fraction(0.4, 2, 3, "geometric") == pytest.approx(0.4 ** (2 / 3))
    assert kept_fraction(0.4, 1, 2, lambda step, steps: 0.25) == pytest.approx(0.85)
    ratios = [step_ratio(0.5, s, 4, "linear") for s in range(1, 5)]
    assert np.prod([1 - r for r in ratios]) == pytest.approx(0.5)
    assert len({round(step_ratio(0.5, s, 3, "geometric"), 9) for s in range(1, 4)}) == 1


def test_iterative_steps_reanalyse_and_rescore():
    model = Net()
    criterion = CountingL1()
    result = graphprune.prune(model, 0.5, X8, criterion=criterion, steps=3, return_result=True)
    assert len(criterion.prepared) == 3
    assert criterion.prepared[0] > criterion.prepared[1] > criterion.prepared[2]  # re-analysed pruned model
    assert [s.step for s in result.steps] == [1, 2, 3]
    sizes = sizes_by_root(model, X8)
    assert sizes == {"stem": 8, "block1": 16, "head": 12}  # exactly one-shot 50%: each step aims at the final count
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_failed_step_restores_the_model():
    model = Net()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    class FailSecond(criteria.L1):
        calls = 0

        def prepare(self, model, report):
            FailSecond.calls += 1
            if FailSecond.calls == 2:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        graphprune.prune(model, 0.5, X8, criterion=FailSecond(), steps=2)
    assert model.stem.out_channels == 16 and model.block1.out_channels == 32
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# ----- budgets
def within(achieved, target, tolerance=0.02):
    return abs(achieved - target) <= tolerance * target


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("metric", ["flops", "params"])
def test_budget_reached_within_two_percent(arch, metric):
    model = getattr(torchvision.models, arch)()
    flops, params = count_flops(model, X64), count_parameters(model)
    result = graphprune.prune(model, example_inputs=X64, return_result=True, **{f"target_{metric}": 0.5})
    assert isinstance(result, PruneResult) and result.model is model
    measured = count_flops(model, X64) / flops if metric == "flops" else count_parameters(model) / params
    assert within(measured, 0.5), measured
    assert result.achieved == pytest.approx(measured) and result.within_tolerance
    assert result.metric == metric and result.target == 0.5
    assert result.before == {"flops": flops, "params": params}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_latency_budget_search_lands_within_two_percent_despite_noise(arch, monkeypatch):
    # A stand-in for the clock: the "latency" is the FLOPs ratio, and every measurement is off
    # by up to 1.5% at random, like repeated timings of one model on a shared CPU.
    model = getattr(torchvision.models, arch)()
    flops = count_flops(model, X64)
    noise = np.random.RandomState(0)
    calls = []

    def noisy_latency(reference, pruned, inputs, **timing):
        calls.append(timing)
        return count_flops(pruned, inputs) / flops * (1 + noise.uniform(-0.015, 0.015))

    monkeypatch.setattr(graphprune.reporting.measure, "latency_ratio", noisy_latency)
    result = graphprune.prune(model, example_inputs=X64, target_latency=0.7, return_result=True)
    assert result.within_tolerance and within(result.achieved, 0.7), result.achieved
    assert within(count_flops(model, X64) / flops, 0.7, 0.035)  # the mean of >= 3 measurements, each within 1.5%
    assert len(calls) >= 4 and all(timing == {} for timing in calls)  # latency_ratio's own repeats and warm-up


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_latency_budget_times_the_pruned_model(arch, monkeypatch):
    # Real timings are no fact of the code: one pruned model timed again reads 1-7% apart on a
    # shared CPU, and how much of a FLOPs cut shows up as time depends on the CPU (at 64x64 on
    # one thread mobilenet_v2's per-layer overhead puts its floor near 0.6 here). So the test
    # asks for the contract, not for a landing (the search itself is tested above on a
    # deterministic noisy clock): the real clock times the unpruned copy against each pruned
    # candidate, the model kept is one of the candidates timed, its result is the mean of its
    # own measurements, and the tolerance flag and the warning tell the truth about it.
    model = getattr(torchvision.models, arch)()
    params = count_parameters(model)
    timed = []  # (reference's parameters, candidate's as a fraction of the original's, measured ratio)
    real = graphprune.reporting.measure.latency_ratio

    def clocked(reference, pruned, inputs, **timing):
        ratio = real(reference, pruned, inputs, **timing)
        timed.append((count_parameters(reference), count_parameters(pruned) / params, ratio))
        return ratio

    monkeypatch.setattr(graphprune.reporting.measure, "latency_ratio", clocked)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = graphprune.prune(model, example_inputs=X64, target_latency=0.7, return_result=True)
    assert timed and all(reference == params for reference, _, _ in timed)  # against the unpruned copy
    assert all(math.isfinite(ratio) and ratio > 0 for _, _, ratio in timed)
    kept = count_parameters(model) / params
    assert kept < 1 and result.steps[0].ratio > 0 and result.after["flops"] < result.before["flops"]
    own = [ratio for _, fraction, ratio in timed if fraction == kept]
    assert own and result.achieved == pytest.approx(np.mean(own))  # the kept model's own timings
    assert result.within_tolerance == within(result.achieved, 0.7)
    assert any(issubclass(w.category, BudgetWarning) for w in caught) == (not result.within_tolerance)


def test_budget_with_global_ranking_and_steps():
    model = torchvision.models.resnet18()
    flops = count_flops(model, X64)
    result = graphprune.prune(model, example_inputs=X64, target_flops=0.4, global_ranking=True, max_ratio=0.8,
                              steps=2, return_result=True)
    assert within(count_flops(model, X64) / flops, 0.4)
    assert len(result.steps) == 2 and result.steps[0].achieved == pytest.approx(0.7, rel=0.02)


def test_unreachable_budget_warns_and_keeps_the_closest():
    model = Net()
    with pytest.warns(BudgetWarning, match="outside the 2% tolerance"):
        result = graphprune.prune(model, example_inputs=X8, target_params=0.01, max_ratio=0.5, return_result=True)
    assert not result.within_tolerance and result.achieved > 0.01
    assert sizes_by_root(model, X8) == {"stem": 8, "block1": 16, "head": 12}


def test_prune_returns_the_model_by_default():
    model = torchvision.models.resnet18()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert graphprune.prune(model, example_inputs=X64, target_flops=0.7) is model


@pytest.mark.parametrize("steps", [2, 3, 8, 16])
@pytest.mark.parametrize("schedule", ["linear", "geometric"])
def test_many_steps_end_where_one_step_ends(steps, schedule):
    """Each step aims at the original group's final count, so the floors of the steps do not
    add up: every group ends with floor(ratio * n) of its n channels removed."""
    torch.manual_seed(0)
    one = Net()
    graphprune.prune(one, 0.5, X8)
    torch.manual_seed(0)
    many = Net()
    result = graphprune.prune(many, 0.5, X8, steps=steps, schedule=schedule, return_result=True)
    assert [p.shape for p in many.parameters()] == [p.shape for p in one.parameters()]
    assert len(result.steps) == steps and sum(s.channels_removed for s in result.steps) > 0
