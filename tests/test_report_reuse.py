"""prune(..., report=analyze(...)): the analysis is reused, and only for the model it describes."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import graphprune
import graphprune.api
from conftest import assert_same_state, state_snapshot

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_pruning_with_the_report_equals_pruning_without_it_and_does_not_analyse_again(monkeypatch):
    expected = graphprune.prune(_model(), 0.5, X)
    model = _model()
    report = graphprune.analyze(model, X)
    monkeypatch.setattr(graphprune.session, "run_analysis", lambda *a, **k: pytest.fail("analysed again"))
    pruned = graphprune.prune(model, 0.5, report=report)  # example_inputs come from the report
    assert pruned is model
    assert_same_state(model, state_snapshot(expected))


def test_weights_updated_in_place_since_analyze_are_what_gets_ranked():
    model = _model()
    report = graphprune.analyze(model, X)
    with torch.no_grad():
        model.conv1.weight[:32].mul_(0.0)  # the stem's first 32 filters become the weakest
    graphprune.prune(model, 0.5, X, report=report)
    assert model.conv1.out_channels == 32
    assert model.conv1.weight.abs().sum(dim=(1, 2, 3)).min() > 0


def _replace_fc(model):
    model.fc = nn.Linear(512, 10)


def _prune_first(model):
    graphprune.prune(model, 0.25, X)


@pytest.mark.parametrize(
    "change, kwargs, message",
    [
        (None, {"report": "not a report"}, "must be a Report"),
        (None, {"inplace": False}, "deep-copy the model and analyze the copy"),
        (None, {"leaf_modules": ["layer1"]}, "fixed by analyze"),
        (None, {"ignored_layers": "fc"}, "fixed by analyze"),
        (None, {"prune_heads": True}, "fixed by analyze"),
        (None, {"example_inputs": torch.randn(1, 3, 64, 64)}, "differ from the ones the report was made with"),
        (_replace_fc, {}, "changed since it was analysed"),
        (_prune_first, {}, "changed since it was analysed"),
    ],
)
def test_a_report_that_does_not_describe_the_model_is_refused_and_nothing_changes(change, kwargs, message):
    model = _model()
    report = graphprune.analyze(model, X)
    if change is not None:
        change(model)
    snapshot = state_snapshot(model)
    with pytest.raises((ValueError, TypeError), match=message):
        graphprune.prune(model, 0.5, **{"report": report, **kwargs})
    assert_same_state(model, snapshot)


def test_a_report_of_another_model_object_is_refused():
    model = _model()
    report = graphprune.analyze(model, X)
    with pytest.raises(ValueError, match="another ResNet object"):
        graphprune.prune(copy.deepcopy(model), 0.5, X, report=report)


def test_a_report_prunes_once():
    model = _model()
    report = graphprune.analyze(model, X)
    graphprune.prune(model, 0.5, X, report=report)
    with pytest.raises(ValueError, match="changed since it was analysed"):
        graphprune.prune(model, 0.5, X, report=report)
