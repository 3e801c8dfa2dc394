"""The analysis keeps its promises on any model: it never changes the model, whatever
containers the model owns, and it never raises anything but graphprune's own errors. A rule
that fails on an op blocks what the op touches, with the exception in the reason; a capture
whose graph cannot be read gives way to the next front-end."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_model_unchanged, group_of, model_state
from oracle import dead_channel_oracle
from torch import nn

import graphprune
from graphprune.analysis import analyzer
from graphprune.analysis.rules import RULES
from graphprune.tracer import export_capture

X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))


class FrozenDict(OrderedDict):
    """A mapping that refuses every change after it is built, as diffusers' config is."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._frozen = True

    def _refuse(self, *args, **kwargs):
        raise RuntimeError(f"You cannot change a {type(self).__name__} instance")

    update = setdefault = pop = popitem = clear = __delitem__ = _refuse

    def __setitem__(self, key, value):
        if getattr(self, "_frozen", False):
            self._refuse()
        super().__setitem__(key, value)


class Configured(nn.Module):
    """A model whose config is a read-only mapping; with ``writes``, forward changes it behind
    its back (through dict's own method), as a cache might."""

    def __init__(self, writes: bool = False):
        super().__init__()
        self.writes = writes
        self._internal_dict = FrozenDict(channels=8, act="relu")
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)

    @property
    def config(self):
        return self._internal_dict

    def forward(self, x):
        if self.writes:
            dict.__setitem__(self._internal_dict, "seen", True)
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


@pytest.mark.parametrize("writes", [False, True])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_read_only_mapping_is_the_very_object_with_the_same_contents_after_analysis(writes, capture):
    model = Configured(writes).eval()
    config, before = model.config, model_state(model)
    graphprune.analyze(model, X, capture=capture)
    assert_model_unchanged(model, before)
    assert model.config is config and dict(config) == {"channels": 8, "act": "relu"}
    graphprune.prune(model, 0.5, X, capture=capture)
    assert model.config is config and model.a.out_channels == 4


def _failing_rule(state, node):
    state.unify(state.labels_of(node.args[0])[1], state.labels_of(node.args[0])[1])
    raise IndexError("a shape this rule was not written for")


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(torch.tanh(self.a(x)))))


def test_a_rule_that_fails_blocks_what_its_op_touches_and_the_rest_prunes(monkeypatch):
    monkeypatch.setitem(RULES, torch.tanh, _failing_rule)
    model = Chain().eval()
    before = model_state(model)
    report = graphprune.analyze(model, X, capture="fx")
    assert_model_unchanged(model, before)
    blocked = group_of(report, "a.weight", 0)
    assert not blocked.prunable
    assert any("tanh" in r and "IndexError: a shape this rule was not written for" in r for r in blocked.blocked)
    assert group_of(report, "b.weight", 0).prunable
    graphprune.prune(model, 0.5, X, capture="fx")
    assert model.a.out_channels == 8 and model.b.out_channels == 4


def test_an_export_graph_that_cannot_be_read_falls_back_to_fx(monkeypatch):
    def unreadable(*args):
        raise AttributeError("'int' object has no attribute 'node'")

    monkeypatch.setattr(export_capture, "_annotated", unreadable)
    with pytest.raises(graphprune.TraceError, match="could not be read: AttributeError"):
        graphprune.analyze(Chain().eval(), X, capture="export")

    class Untraceable(nn.Module):  # data-dependent control flow: torch.fx cannot take the root
        def __init__(self):
            super().__init__()
            self.body = Chain()

        def forward(self, x):
            return self.body(x) if x.sum() > -1e9 else x

    report = graphprune.analyze(Untraceable().eval(), X)  # auto: fx fails, export fails, fx per child
    assert group_of(report, "body.a.weight", 0).prunable


def test_an_internal_failure_after_the_rules_is_one_documented_error_and_the_model_is_unchanged(monkeypatch):
    def broken(*args):
        raise KeyError(0)

    monkeypatch.setattr(analyzer, "build_groups", broken)
    model = Chain().eval()
    before = model_state(model)
    with pytest.raises(graphprune.AnalysisError, match="KeyError") as caught:
        graphprune.analyze(model, X)
    assert isinstance(caught.value.__cause__, KeyError)
    assert_model_unchanged(model, before)


class TwoStreams(nn.Module):
    """Called with one dict of tensors, ``model(batch)``."""

    def __init__(self):
        super().__init__()
        self.rgb, self.depth, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(1, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, batch):
        return self.head(F.relu(self.rgb(batch["rgb"]) + self.depth(batch["depth"])))


BATCH = {"rgb": X, "depth": X[:, :1]}


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_dict_of_tensors_passed_as_one_argument_prunes(capture):
    report = graphprune.analyze(TwoStreams().eval(), (BATCH,), capture=capture)
    group = group_of(report, "rgb.weight", 0)
    assert group.prunable and {"rgb", "depth", "head"} <= set(group.layers())
    summary = dead_channel_oracle(TwoStreams(), (BATCH,), capture=capture)
    assert summary["groups_tested"] == 1 and summary["params_after"] < summary["params_before"]


class SlicedStack(nn.Module):
    """Runs all but the last layer of a Sequential, ``self.m[:-1](x)``: torch.export names the
    layers reached through the slice ``m.slice(None, -1, None).1``."""

    def __init__(self):
        super().__init__()
        self.m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.m[:-1](x)))


def test_layers_reached_through_a_sliced_sequential_are_found_under_export():
    report = graphprune.analyze(SlicedStack().eval(), X, capture="export")
    group = group_of(report, "m.0.weight", 0)
    assert group.prunable and {"m.0", "m.1", "head"} <= set(group.layers())
    summary = dead_channel_oracle(SlicedStack(), X, capture="export", assumed=True)
    assert summary["groups_tested"] >= 1 and summary["params_after"] < summary["params_before"]


def test_a_model_left_unchanged_says_why_as_an_error_with_where_capture_failed():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 3)

        def forward(self, x):
            return self.body(x) if x.sum() > -1e9 else x

    report = graphprune.analyze(Untraceable().eval(), torch.randn(2, 4))
    assert report.outcome == "error" and "" in report.capture_failures()
    text = str(report)
    assert "ERROR: no prunable channel group" in text and "not traced: <root> its forward could not be traced" in text
    assert "test_promises.py" in text  # the file and line where tracing failed


# --------------------------------------------------------------------------- models that try to break the promises
class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * x

    @staticmethod
    def backward(ctx, grad):
        return grad


class Adversarial(nn.Module):
    """A forward that changes what it owns, reads values, makes data-dependent sizes and calls
    what no rule knows, one ``kind`` at a time, around a conv chain."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.seen, self.calls, self.options = [], 0, {"scale": 1.0}
        self.frozen = FrozenDict(width=8)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.kind == "mutates":  # its own list, dict, counter and buffer, in place
            self.seen.append(y.shape[1])
            self.options["last"] = 1
            self.calls += 1
            self.count += 1
            dict.__setitem__(self.frozen, "touched", True)
        elif self.kind == "where":  # one-argument where: index tensors, a data-dependent size
            rows, cols = torch.where(y[:, 0, 0] > 0), torch.where(y.flatten(2).amax(-1) > 0)
            y = y + len(rows[0]) * 0 + cols[1].sum() * 0
        elif self.kind == "item":  # a value read in forward
            y = y * float(y.abs().max().item() > -1)
        elif self.kind == "unique":  # a size that depends on the values
            y = y + torch.unique(torch.zeros(3)).sum()
        elif self.kind == "autograd":  # a custom autograd function: no rule
            y = _Square.apply(y)
        elif self.kind == "dict_of_lists":
            y = {"maps": [y, y * 2]}["maps"][1]
        return self.b(y)


KINDS = ["mutates", "where", "item", "unique", "autograd", "dict_of_lists"]


def _contents(model: nn.Module) -> dict:
    return {"seen": list(model.seen), "calls": model.calls, "options": dict(model.options),
            "frozen": dict(model.frozen), "count": model.count.clone()}


@pytest.mark.filterwarnings("ignore:ERROR. no prunable channel group")  # models no front-end can take whole
@pytest.mark.parametrize("capture", ["auto", "fx", "export"])
@pytest.mark.parametrize("kind", KINDS)
def test_analysis_of_an_adversarial_model_changes_nothing_and_raises_only_graphprune_errors(kind, capture):
    model = Adversarial(kind).eval()
    before, contents, frozen = model_state(model), _contents(model), model.frozen
    try:
        report = graphprune.analyze(model, X, capture=capture)
    except graphprune.TraceError:  # documented: the front-end asked for cannot capture this model
        assert capture != "auto"
        report = None
    assert_model_unchanged(model, before)
    after = _contents(model)
    assert after.pop("count").equal(contents.pop("count")) and after == contents and model.frozen is frozen
    if report is not None:
        assert report.groups  # every group is there, prunable or blocked with its reason
        if kind != "autograd":
            graphprune.prune(model, 0.5, X, capture=capture)
            assert model(X).shape == (2, 4, 12, 12)


class HeadsThroughABuffer(nn.Module):
    """Graph attention as torch_geometric writes it: features viewed as (heads, width) with a
    per-head parameter, written into a buffer made from their shape, then merged back. The
    buffer's heads dim is tied to the blocked heads dim only by the add; the merge must see it."""

    def __init__(self):
        super().__init__()
        self.heads, self.width = 4, 6
        self.lin, self.att, self.out = nn.Linear(8, 24), nn.Parameter(torch.randn(1, 4, 6)), nn.Linear(24, 5)

    def forward(self, x):
        h = self.lin(x).view(-1, self.heads, self.width)
        scores = (h * self.att).sum(-1, keepdim=True).sigmoid()
        merged = h.new_zeros(h.shape) + h * scores
        return self.out(merged.flatten(1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_dim_tied_to_a_blocked_one_does_not_stop_a_merge(capture):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    group = group_of(graphprune.analyze(HeadsThroughABuffer().eval(), x, capture=capture), "lin.weight", 0)
    assert group.prunable and group.size == 6  # the width; the heads stay
    assert dead_channel_oracle(HeadsThroughABuffer(), x, capture=capture, assumed=True)["groups_tested"] == 1
