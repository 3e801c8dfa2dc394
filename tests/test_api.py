"""The public API: analyze / prune arguments, inplace, ignored layers, example inputs, modes,
training after pruning."""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import graphprune
from small_net import assert_consistent, small_net, widths
from conftest import assert_same_state, count_params, group_of, size_attrs, state_snapshot, training_flags

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- ratio
def test_ratio_zero_leaves_model_bit_identical():
    model = small_net()
    with torch.no_grad():
        reference = model(X)
    snapshot, attrs = state_snapshot(model), size_attrs(model)
    params = list(model.parameters())
    assert graphprune.prune(model, 0.0, X) is model
    assert_same_state(model, snapshot)
    assert size_attrs(model) == attrs
    assert all(a is b for a, b in zip(model.parameters(), params))
    with torch.no_grad():
        assert torch.equal(model(X), reference)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_ratio_removes_floor_ratio_n_channels_of_every_group(ratio):
    model = small_net()
    with torch.no_grad():
        shape = model(X).shape
    params = count_params(model)
    graphprune.prune(model, ratio, X)
    assert widths(model) == tuple(n - math.floor(ratio * n) for n in (16, 12, 24))
    assert_consistent(model)
    assert count_params(model) < params
    with torch.no_grad():
        assert model(X).shape == shape == (2, 10)
    # The classifier's outputs reach the model output: never pruned.
    assert model.fc.out_features == 10


def test_ratio_half_on_resnet18_keeps_output_shape_and_drops_parameters():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    params = count_params(model)
    graphprune.prune(model, 0.5, x)
    assert count_params(model) < 0.35 * params  # most weights sit in convs pruned on both sides
    assert model.conv1.out_channels == 32 and model.fc.in_features == 256 and model.fc.out_features == 1000
    with torch.no_grad():
        assert model(x).shape == (1, 1000)


@pytest.mark.parametrize(
    "ratio, error, message",
    [
        (-0.1, ValueError, "ratio must lie in [0, 1), got -0.1"),
        (1.0, ValueError, "ratio must lie in [0, 1), got 1.0"),
        (1.5, ValueError, "ratio must lie in [0, 1), got 1.5"),
        (float("nan"), ValueError, "ratio must lie in [0, 1), got nan"),
        (True, TypeError, "ratio must be a real number in [0, 1), got bool"),
        ("0.5", TypeError, "ratio must be a real number in [0, 1), got str"),
        (torch.tensor(0.5), TypeError, "ratio must be a real number in [0, 1), got Tensor"),
    ],
)
def test_invalid_ratio_is_rejected_before_anything_changes(ratio, error, message):
    model = small_net()
    snapshot = state_snapshot(model)
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        graphprune.prune(model, ratio, X)
    assert_same_state(model, snapshot)


def test_numpy_ratio_is_accepted():
    model = small_net()
    graphprune.prune(model, np.float64(0.5), X)
    assert widths(model) == (8, 6, 12)


def test_criterion_names():
    model = small_net()
    graphprune.prune(model, 0.5, X, criterion="L2")
    assert widths(model) == (8, 6, 12)
    with pytest.raises(ValueError, match="unknown criterion 'nope'"):
        graphprune.prune(small_net(), 0.5, X, criterion="nope")
    with pytest.raises(TypeError, match="criterion must be a name or a Criterion instance, got int"):
        graphprune.prune(small_net(), 0.5, X, criterion=3)


@pytest.mark.parametrize("call", [graphprune.analyze, lambda m, x: graphprune.prune(m, 0.5, x)])
@pytest.mark.parametrize("bad, kind", [([nn.Linear(2, 2)], "list"), ("model", "str"), (None, "NoneType")])
def test_non_module_is_a_type_error(call, bad, kind):
    with pytest.raises(TypeError, match=f"^model must be a torch.nn.Module, got {kind}$"):
        call(bad, X)


# --------------------------------------------------------------------------- training after pruning
def test_training_works_after_pruning():
    model = small_net().train()
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    F.cross_entropy(model(images), labels).backward()  # stale grads of the old shapes
    graphprune.prune(model, 0.5, X)
    assert model.training and all(m.training for m in model.modules())
    for name, p in model.named_parameters():
        assert isinstance(p, nn.Parameter) and p.requires_grad, name
        assert p.grad is None or p.grad.shape == p.shape, name
    model.zero_grad(set_to_none=True)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.shape == p.shape, name
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    # BatchNorm statistics kept the pruned width while training updated them.
    assert model.bn1.running_mean.shape == (8,) and model.bn1.num_batches_tracked > 0


# --------------------------------------------------------------------------- inplace / ignored_layers
def test_inplace_false_leaves_the_original_untouched():
    model = small_net()
    snapshot, attrs = state_snapshot(model), size_attrs(model)
    pruned = graphprune.prune(model, 0.5, X, inplace=False)
    assert pruned is not model
    assert widths(pruned) == (8, 6, 12) and widths(model) == (16, 12, 24)
    assert_same_state(model, snapshot)
    assert size_attrs(model) == attrs
    assert not set(map(id, pruned.parameters())) & set(map(id, model.parameters()))
    with torch.no_grad():
        assert pruned(X).shape == model(X).shape


@pytest.mark.parametrize("form", ["list", "str", "module"])
def test_ignored_layers_keep_their_shapes(form):
    model = small_net()
    ignored = {"list": ["conv3"], "str": "conv3", "module": [model.conv3]}[form]
    conv3 = model.conv3.weight.shape
    report = graphprune.analyze(model, X, ignored_layers=ignored)
    # conv3 reads the residual stream and writes its own width: both groups are blocked.
    assert group_of(report, "conv3.weight", 0).blocked == ["ignored_layers: conv3"]
    assert group_of(report, "conv3.weight", 1).blocked == ["ignored_layers: conv3"]
    assert "ignored_layers: conv3" in str(report)
    graphprune.prune(model, 0.5, X, ignored_layers=ignored)
    assert model.conv3.weight.shape == conv3
    assert widths(model) == (16, 6, 24)  # only the inner width was free to go
    assert_consistent(model)


def test_ignored_layers_prefix_covers_submodules():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    layer4 = {n: p.shape for n, p in model.layer4.named_parameters()}
    graphprune.prune(model, 0.5, x, ignored_layers=["layer4"])
    assert {n: p.shape for n, p in model.layer4.named_parameters()} == layer4
    assert model.layer1[0].conv1.out_channels == 32


@pytest.mark.parametrize(
    "ignored, shown",
    [(["conv3", "nope"], "['nope']"), (["layer1"], "['layer1']"), ([nn.Conv2d(1, 1, 1)], "['Conv2d']")],
)
def test_unknown_ignored_layers_are_a_value_error(ignored, shown):
    model = small_net()
    snapshot = state_snapshot(model)
    message = f"ignored_layers has entries that are not submodules of SmallNet: {shown}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        graphprune.prune(model, 0.5, X, ignored_layers=ignored)
    with pytest.raises(ValueError, match=re.escape(message)):
        graphprune.analyze(model, X, ignored_layers=ignored)
    assert_same_state(model, snapshot)


# --------------------------------------------------------------------------- example inputs
def test_wrong_input_shape_is_a_value_error_and_changes_nothing():
    model = small_net()
    snapshot, attrs = state_snapshot(model), size_attrs(model)
    bad = torch.randn(1, 4, 16, 16)
    with pytest.raises(ValueError, match="SmallNet raised RuntimeError on the example inputs: .*Pass example_inputs"):
        graphprune.prune(model, 0.5, bad)
    with pytest.raises(ValueError, match="on the example inputs"):
        graphprune.analyze(model, bad)
    assert_same_state(model, snapshot)
    assert size_attrs(model) == attrs
    assert not model.training


def test_inferred_inputs_warn_and_prune_works():
    model = torchvision.models.resnet18(weights=None).eval()
    params = count_params(model)
    expected = re.escape("example_inputs not given; using a random tensor of shape (1, 3, 224, 224) (first layer Conv2d)")
    with pytest.warns(graphprune.InferredInputWarning, match=expected):
        report = graphprune.analyze(model)
    assert report.input_description == "inferred tensor(1, 3, 224, 224)"
    with pytest.warns(graphprune.InferredInputWarning, match=expected):
        graphprune.prune(model, 0.3)
    assert count_params(model) < params
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("call", ["analyze", "prune"])
def test_inferred_input_warning_points_at_the_caller(call):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if call == "analyze":
            graphprune.analyze(model)
        else:
            graphprune.prune(model, 0.5)
    inferred = [w for w in caught if issubclass(w.category, graphprune.InferredInputWarning)]
    assert len(inferred) == 1
    assert "shape (1, 6) (first layer Linear)" in str(inferred[0].message)
    assert inferred[0].filename == __file__, f"warning attributed to {inferred[0].filename}"


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(5, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, image, extra):
        return self.head(F.relu(self.a(image) + self.b(extra)))


IMAGE, EXTRA = torch.randn(1, 3, 8, 8), torch.randn(1, 5, 8, 8)


@pytest.mark.parametrize(
    "inputs", [(IMAGE, EXTRA), {"image": IMAGE, "extra": EXTRA}, {"extra": EXTRA, "image": IMAGE}],
    ids=["tuple", "dict", "dict-reordered"],
)
def test_tuple_and_dict_example_inputs(inputs):
    model = TwoInputs().eval()
    report = graphprune.analyze(model, inputs)
    assert [g.size for g in report.prunable_groups] == [8]
    assert group_of(report, "a.weight", 0) is group_of(report, "b.weight", 0)
    assert group_of(report, "b.weight", 1).blocked == ["model input"]
    graphprune.prune(model, 0.5, inputs)
    assert model.a.out_channels == model.b.out_channels == model.head.in_channels == 4
    with torch.no_grad():
        assert model(IMAGE, EXTRA).shape == (1, 2, 8, 8)
        assert model(image=IMAGE, extra=EXTRA).shape == (1, 2, 8, 8)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"image": IMAGE, "mask": EXTRA}, "example_inputs has keys ['mask'] that forward() does not take"),
        ({"image": IMAGE}, "example_inputs has no value for forward() argument 'extra'"),
        ((EXTRA, IMAGE), "TwoInputs raised RuntimeError on the example inputs"),
    ],
)
def test_bad_structured_inputs(inputs, message):
    model = TwoInputs().eval()
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        graphprune.prune(model, 0.5, inputs)
    assert_same_state(model, snapshot)


# --------------------------------------------------------------------------- nothing to prune / modes
def test_model_without_prunable_group_warns_and_is_returned_unchanged():
    model = nn.Sequential(nn.Linear(4, 3)).eval()  # input and output channels only
    snapshot = state_snapshot(model)
    report = graphprune.analyze(model, torch.randn(2, 4))
    assert report.groups and not report.prunable_groups
    assert report.outcome == "error" and "ERROR: no prunable channel group" in str(report)
    assert [reason for reason, _ in report.top_reasons()] == ["reaches output", "model input"]  # by params held
    assert "blocked (80% of params): model input" in str(report)
    with pytest.warns(UserWarning, match=r"^ERROR: no prunable channel group: prune\(\) leaves Sequential unchanged\n"
                                         r"  blocked \(100% of params\): reaches output") as record:
        result = graphprune.prune(model, 0.5, torch.randn(2, 4))
    assert result is model
    assert record[0].filename == __file__
    assert_same_state(model, snapshot)


@pytest.mark.parametrize("call", ["analyze", "prune"])
def test_training_flags_are_restored(call):
    model = small_net().train()
    model.bna.eval()  # a mixed state must come back exactly
    flags = training_flags(model)
    if call == "analyze":
        graphprune.analyze(model, X)
    else:
        graphprune.prune(model, 0.5, X)
    assert training_flags(model) == flags
    # and eval models stay in eval mode
    model = small_net().eval()
    flags = training_flags(model)
    if call == "analyze":
        graphprune.analyze(model, X)
    else:
        graphprune.prune(model, 0.5, X)
    assert training_flags(model) == flags


def test_analyze_does_not_modify_the_model():
    model = small_net()
    snapshot, attrs = state_snapshot(model), size_attrs(model)
    report = graphprune.analyze(model, X)
    assert_same_state(model, snapshot)
    assert size_attrs(model) == attrs
    assert sorted(g.size for g in report.prunable_groups) == [12, 16, 24]
    text = str(report)
    assert text.startswith(f"graphprune analysis of SmallNet: {len(report.groups)} groups, 3 prunable")
    assert len(text.splitlines()) == 3 + len(report.groups)  # title, header, rule, one row per group


def test_more_positional_inputs_than_forward_takes_is_a_value_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"holds 2 positional inputs but forward\(\) takes 1 \(input\)\. A tuple's"):
        graphprune.analyze(model, (x, x))


@pytest.mark.parametrize("name, home", [
    ("PruningEngine", "graphprune.compat"), ("plan_removal", "graphprune.pruning.planner"),
    ("sync_criterion", "graphprune.workflow.distributed"), ("visualize", "graphprune.reporting.visualize"),
])
def test_moved_names_still_work_with_a_deprecation_warning(name, home):
    with pytest.warns(DeprecationWarning, match=f"graphprune.{name} moved to {home}"):
        value = getattr(graphprune, name)
    assert value is not None and name not in graphprune.__all__


def test_moved_modules_still_import_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("graphprune.measure", None)
    with pytest.warns(DeprecationWarning, match="graphprune.measure moved to graphprune.reporting.measure"):
        module = importlib.import_module("graphprune.measure")
    from graphprune.reporting import measure

    assert module is measure


def test_the_analysis_options_are_checked_once_and_carried_to_every_renewed_analysis():
    from graphprune.analysis.analyzer import AnalysisOptions

    model = torchvision.models.resnet18().eval()
    session = graphprune.PruningSession(model, torch.randn(1, 3, 32, 32), ignored_layers=["layer4"], capture="fx")
    options = session.analysis.options
    assert options == AnalysisOptions.checked(model, (), ["layer4"], False, "fx") and hash(options)
    session.apply({session.report.prunable_groups[0]: [0, 1]})
    assert session.renewed().analysis.options == options
    with pytest.raises(ValueError, match="ignored_layers has entries that are not submodules of ResNet"):
        AnalysisOptions.checked(model, ignored_layers=["nope"])
