"""Tracing from the user's side: untraceable code, shape propagation, layouts, the GC."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import graphprune
from graphprune import tracer
from conftest import assert_same_state, group_of, state_snapshot
from oracle import dead_channel_oracle


def _conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


# --------------------------------------------------------------------------- untraceable code
class Gate(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace this
            return self.conv(x)
        return x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate(8)
        self.mid = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.mid(self.gate(F.relu(self.stem(x))))))


class RootControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3, 1, 1))

    def forward(self, x):
        if x.sum() > 0:
            return x * self.scale
        return x


X8 = torch.randn(1, 3, 8, 8)


def test_untraceable_submodule_error_names_it_and_suggests_leaf_modules():
    with pytest.raises(graphprune.TraceError) as info:
        tracer.capture(Gated())
    error = info.value
    assert error.module_name == "gate"
    message = str(error)
    assert "in module 'gate' (Gate)" in message
    assert "if x.sum() > 0:" in message and __file__ in message
    assert "leaf_modules=['gate']" in message


def test_untraceable_submodule_becomes_opaque_and_blocks_its_channels():
    model = Gated().eval()
    report = graphprune.analyze(model, X8)
    assert list(report.graph.graph["opaque"]) == ["gate"]
    for name, dim in (("stem.weight", 0), ("mid.weight", 1)):
        blocked = group_of(report, name, dim).blocked
        assert len(blocked) == 1 and "'gate'" in blocked[0] and "could not be traced" in blocked[0]
    assert group_of(report, "mid.weight", 0).prunable
    gate = model.gate.conv.weight.detach().clone()
    graphprune.prune(model, 0.5, X8)
    assert model.mid.out_channels == 3 and model.stem.out_channels == 8
    assert torch.equal(model.gate.conv.weight, gate)


def test_leaf_modules_makes_an_untraceable_submodule_analyzable():
    model = Gated().eval()
    report = graphprune.analyze(model, X8, leaf_modules=["gate"])
    blocked = group_of(report, "stem.weight", 0).blocked
    assert len(blocked) == 1 and "'gate'" in blocked[0]
    assert group_of(report, "mid.weight", 0).prunable
    graphprune.prune(model, 0.5, X8, leaf_modules=[Gate])
    assert model.mid.out_channels == 3
    with pytest.raises(ValueError, match=r"leaf_modules names \['nope'\] are not submodules of Gated"):
        graphprune.analyze(model, X8, leaf_modules=["nope"])


def test_untraceable_root_forward_raises_trace_error():
    model = RootControlFlow()
    snapshot = state_snapshot(model)
    for call in (lambda: graphprune.analyze(model, X8), lambda: graphprune.prune(model, 0.5, X8)):
        with pytest.raises(graphprune.TraceError, match=r"in the model's own forward.*leaf_modules"):
            call()
    assert_same_state(model, snapshot)


# --------------------------------------------------------------------------- shape propagation
class _DeviceSpy(nn.Module):
    """A leaf that records the device of every input it sees; ``needs_values`` reads one.

    ``seen`` is a class attribute: the meta run calls a copy of the module, not the module."""

    seen: list = []

    def __init__(self, needs_values: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.needs_values = needs_values

    def forward(self, x):
        _DeviceSpy.seen.append(x.device.type)
        scale = float(x.abs().max()) if self.needs_values else 1.0  # .item() raises on meta tensors
        return self.conv(x) * scale


@pytest.mark.parametrize("needs_values, devices", [(False, ["meta"]), (True, ["meta", "cpu"])])
def test_shapes_are_propagated_on_meta_tensors_with_a_real_run_as_fallback(needs_values, devices, monkeypatch):
    monkeypatch.setattr(_DeviceSpy, "seen", [])
    spy = _DeviceSpy(needs_values)
    model = nn.Sequential(spy, nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)).eval()
    weight = model[2].weight.detach().clone()
    report = graphprune.analyze(model, torch.randn(1, 3, 8, 8), leaf_modules=[spy])
    assert _DeviceSpy.seen == devices  # no arithmetic unless the graph needs values
    assert [g.size for g in report.groups if any(m.name == "2.weight" and m.dim == 0 for m in g.members)] == [4]
    assert model[2].weight.device.type == "cpu" and torch.equal(model[2].weight, weight)




class _ScaledByInput(nn.Module):
    """conv -> relu -> conv, times a scale that ``scale`` (a leaf) reads from the input's values
    when ``needs_values``: then the shapes can only be recorded on real tensors."""

    def __init__(self, needs_values: bool):
        super().__init__()
        self.conv0, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.scale = _DeviceSpy(needs_values)

    def forward(self, x):
        return self.conv2(self.conv0(x).relu()) * self.scale(x).mean()


def test_a_model_whose_shapes_need_values_is_audited_after_the_values_are_copied(monkeypatch):
    """The audit first runs while the pruned tensors hold zero placeholders; a model that could
    only be recorded on real values is audited once the kept values are in place."""
    audits, audit = [], graphprune.session.audit

    def spying(*args, **options):
        audits.append(args[-1])  # filled
        return audit(*args, **options)

    monkeypatch.setattr(graphprune.session, "audit", spying)
    for needs_values, expected in ((False, [False]), (True, [False, True])):
        audits.clear()
        model = _ScaledByInput(needs_values).eval()
        graphprune.prune(model, 0.5, torch.randn(1, 3, 8, 8), leaf_modules=[model.scale])
        assert audits == expected
        assert model.conv0.out_channels == model.conv2.in_channels == 4

class _EmptyBeside(nn.Module):
    """Builds a zero-size tensor next to the channel path (its one dim has no channel to map)."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.c(x)
        return self.d(y) + y.new_zeros(0).sum()


def test_zero_size_tensors_are_analysed():
    report = graphprune.analyze(_EmptyBeside(), torch.randn(1, 3, 4, 4))
    assert [g.prunable for g in report.groups if any(m.module == "c" and m.dim == 0 for m in g.members)] == [True]


def test_a_layer_with_zero_input_features_is_analysed_and_pruned():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # initialising a zero-element weight is a no-op
        model = nn.Sequential(nn.Linear(0, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 0)
    report = graphprune.analyze(model, x)
    assert [g.size for g in report.prunable_groups] == [4]
    assert dead_channel_oracle(copy.deepcopy(model), x, fraction=0.5)["channels_removed"] == 2
    graphprune.prune(model, 0.5, x)
    assert model[0].out_features == model[2].in_features == 2 and model(x).shape == (2, 3)


def test_a_channels_last_model_stays_channels_last_after_pruning():
    model = torchvision.models.resnet18().eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 32, 32)
    expected_layouts = {n: p.is_contiguous(memory_format=torch.channels_last) for n, p in model.named_parameters()}
    graphprune.prune(model, 0.5, x)
    assert model.layer1[0].conv1.out_channels == 32
    layouts = {n: p.is_contiguous(memory_format=torch.channels_last) for n, p in model.named_parameters()}
    assert layouts == expected_layouts and layouts["layer1.0.conv1.weight"]
    assert not model.layer1[0].conv1.weight.is_contiguous()  # really channels-last, not merely contiguous
    model(x)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_restored_after_analysis_and_after_a_failed_prune(enabled):
    import gc

    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        graphprune.analyze(_conv_net(), X8)
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError):
            graphprune.prune(_conv_net(), 0.5, torch.randn(1, 5, 8, 8))  # inputs the model rejects
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


class _TracedPathNotRun(nn.Module):
    """torch.fx traces ``~mask`` on what the opaque encoder returns, but at run time the mask is
    None: the traced graph fails on meta tensors exactly as it would on the real ones."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            if x.shape[-1] > 100:  # torch.fx cannot take this branch: the encoder becomes an opaque leaf
                return self.conv(x), x > 0
            return self.conv(x), None

    def __init__(self):
        super().__init__()
        self.encoder, self.head = self.Encoder(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        features, mask = self.encoder(x)
        return self.head(features) if mask is None else self.head(features) * (~mask).any()


def test_a_traced_graph_that_fails_on_meta_as_it_would_on_values_is_not_run_on_values(monkeypatch):
    from graphprune.tracer import graph as graph_module, record

    runs = []
    real_run = record.Recorder.run
    monkeypatch.setattr(record.Recorder, "run", lambda self, *a: runs.append(type(self)) or real_run(self, *a))
    calls = []
    monkeypatch.setattr(graph_module, "input_error", lambda *a, **k: calls.append(1))
    report = graphprune.analyze(_TracedPathNotRun().eval(), torch.randn(1, 3, 8, 8))
    assert record.Recorder not in runs and not calls  # meta runs only; the whole model never ran for the check
    assert report.session.analysis.front_end == "export" and report.prunable_groups


class _BranchOnValues(nn.Module):
    """A detector's shape: traceable children, and a root that branches on the values, which
    neither torch.fx nor torch.export (without deciding on the values) can capture."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        features = self.backbone(x)
        if features.mean() > 100:  # on the values
            features = features * 2
        return self.head(features)


def test_a_failed_export_with_a_fallback_left_runs_no_input_check_of_its_own(monkeypatch):
    from graphprune.tracer import export_capture, fallback

    calls = []
    monkeypatch.setattr(export_capture, "input_error", lambda *a, **k: calls.append("export"))
    monkeypatch.setattr(fallback, "input_error", lambda *a, **k: calls.append("fallback"))
    report = graphprune.analyze(_BranchOnValues().eval(), torch.randn(1, 3, 8, 8))
    assert report.session.analysis.front_end == "fx" and "backbone" in {g.root.split(".")[0] for g in report.prunable_groups}
    assert "export" not in calls  # the failed export runs no whole model to ask whether the inputs were at fault
    monkeypatch.undo()
    with pytest.raises(ValueError, match="Pass example_inputs that the model accepts"):
        graphprune.analyze(_BranchOnValues().eval(), torch.randn(1, 5, 8, 8))


class _InstallsHooks(nn.Module):
    """Registers a forward hook on its child on its first call and keeps it, as transformers'
    output capturing does: the analysis takes the hook back out of the module's hook dict."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        if not self.a._forward_hooks:
            self.a.register_forward_hook(lambda module, args, output: None)
        return self.b(self.a(x).relu())


def test_a_hook_the_forward_installs_is_taken_back_leaving_the_hook_dict_whole():
    model, x = _InstallsHooks().eval(), torch.randn(1, 3, 4, 4)
    graphprune.analyze(model, x)
    assert not model.a._forward_hooks  # taken back
    model(x)  # installs it again, into the dict the analysis restored
    assert len(dict(model.a._forward_hooks)) == 1  # an order that lost track of its dict would raise KeyError
    graphprune.prune(model, 0.5, x)  # the hook now on the model blocks a's channels; nothing breaks
    assert len(dict(model.a._forward_hooks)) == 1


class _NestedBranches(nn.Module):
    """A detector's nesting: the root and one of its children branch on the values, so the
    child's own children are traced apart too."""

    class Inner(nn.Module):
        calls = 0

        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 8, 1))
            self.b = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            type(self).calls += type(x) is torch.Tensor  # a run, not a trace
            y = self.a(x)
            return self.b(y) if y.mean() < 100 else y  # on the values

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 8, 1))
        self.inner, self.head = self.Inner(), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.inner(self.stem(x))
        return self.head(y) if y.mean() < 100 else y


def test_nested_untraceable_modules_are_traced_from_one_run_of_the_model():
    model = _NestedBranches().eval()
    _NestedBranches.Inner.calls = 0
    report = graphprune.analyze(model, torch.randn(1, 3, 4, 4))
    assert _NestedBranches.Inner.calls == 1  # the model's one run recorded the inner module's children too
    assert {g.root for g in report.prunable_groups} == {"inner.a.0", "stem.0"}  # within the traced parts
