"""What the traced graph does not show blocks the channels involved, with a reason; the
rest is still pruned, and the analysis leaves nothing behind on the model.

* a tensor the forward stores on a module (``self.aux_logits = ...``, or in a dict it holds);
* forward hooks and forward-pre hooks;
* weights computed on each call (parametrizations: weight_norm, spectral_norm);
* buffers: read through the graph, so a buffer viewed with a literal size blocks, and one
  used elementwise is pruned with its channels; integer buffers are indices, never channels;
* constants torch.fx attaches to the model while tracing.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import graphprune
from conftest import assert_model_unchanged, group_of, model_state, run_oracle

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _blocked_with(report, name: str, dim: int, *phrases: str) -> None:
    group = group_of(report, name, dim)
    assert not group.prunable
    assert any(all(p in reason for p in phrases) for reason in group.blocked), group.blocked


# --------------------------------------------------------------------------- stored outputs
class AuxHead(nn.Module):
    """Auxiliary logits kept on the module for a training loss: a second, unseen output."""

    def __init__(self, into_dict: bool = False):
        super().__init__()
        self.into_dict = into_dict
        self.features = nn.Conv2d(3, 16, 3)
        self.aux = nn.Linear(16, 5)
        self.head = nn.Linear(16, 3)
        self.extras = {}

    def forward(self, x):
        f = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        if self.into_dict:
            self.extras["aux"] = self.aux(f)
        else:
            self.aux_logits = self.aux(f)
        return self.head(f)


@pytest.mark.parametrize("into_dict", [False, True])
def test_a_tensor_stored_on_a_module_is_an_output(into_dict):
    model = AuxHead(into_dict).eval()
    before = model_state(model)
    report = graphprune.analyze(model, X)
    assert_model_unchanged(model, before)  # neither the stored value nor a Proxy stays behind
    where = "extras" if into_dict else "aux_logits"
    _blocked_with(report, "aux.weight", 0, f"stored on {where} by forward")
    assert group_of(report, "features.weight", 0).prunable
    graphprune.prune(model, 0.5, X)
    model(X)
    stored = model.extras["aux"] if into_dict else model.aux_logits
    assert stored.shape == (2, 5) and model.features.out_channels == 8  # no class was lost
    run_oracle(AuxHead(into_dict).eval(), X, groups=1)


# --------------------------------------------------------------------------- hooks
class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.left_out, self.right_out = nn.Conv2d(8, 4, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.left_out(F.relu(self.left(x))) + self.right_out(F.relu(self.right(x)))


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_a_module_with_hooks_blocks_its_channels_and_keeps_its_hooks(kind):
    model = TwoBranches().eval()
    bias = torch.linspace(0, 1, 8).view(1, 8, 1, 1)
    if kind == "forward":  # the hooked module is opaque: its reader carries the reason
        model.left.register_forward_hook(lambda module, args, output: output + bias)
        hooked, reader = "left", ("left_out.weight", 1)
    else:
        model.left_out.register_forward_pre_hook(lambda module, args: (args[0] + bias,))
        hooked, reader = "left_out", ("left.weight", 0)
    report = graphprune.analyze(model, X)
    _blocked_with(report, *reader, f"'{hooked}' (Conv2d) has forward hooks (", "remove them")
    assert group_of(report, "right.weight", 0).prunable
    with torch.no_grad():
        graphprune.prune(model, 0.5, X)
        assert model.left.out_channels == 8 and model.right.out_channels == 3
        model(X)  # the hook still fits the channels it sees


# --------------------------------------------------------------------------- parametrizations
@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated")
@pytest.mark.parametrize("parametrize", [parametrizations.orthogonal, torch.nn.utils.weight_norm])
def test_a_computed_weight_blocks_its_channels_with_the_remedy(parametrize):
    """A parametrization that may mix channels (weight_norm and spectral_norm prune: see
    tests/test_parametrized.py)."""
    model = TwoBranches().eval()
    parametrize(model.left_out)
    report = graphprune.analyze(model, X)
    if parametrize is torch.nn.utils.weight_norm:  # the old form recomputes the weight in a pre-hook
        _blocked_with(report, "left.weight", 0, "'left_out' (Conv2d) has forward hooks (WeightNorm)")
    else:
        _blocked_with(report, "left.weight", 0, "parametrization graphprune does not know (_Orthogonal)",
                      "remove_parametrizations")
    assert group_of(report, "right.weight", 0).prunable
    graphprune.prune(model, 0.5, X)
    assert model.left.out_channels == 8 and model.right.out_channels == 3
    model(X)


# --------------------------------------------------------------------------- buffers
class ScaledByBuffer(nn.Module):
    def __init__(self, literal_view: bool):
        super().__init__()
        self.literal_view = literal_view
        self.conv, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 16))
        self.register_buffer("order", torch.arange(4).flip(0))  # an integer buffer: indices

    def forward(self, x):
        scale = self.scale.view(1, 16, 1, 1) if self.literal_view else self.scale[:, None, None]
        return self.out(self.conv(x) * scale)[:, self.order]


def test_a_buffer_viewed_with_a_literal_size_blocks():
    report = graphprune.analyze(ScaledByBuffer(literal_view=True).eval(), X)
    _blocked_with(report, "conv.weight", 0, "has a fixed size 16")


def test_a_buffer_used_elementwise_is_pruned_with_its_channels():
    model = ScaledByBuffer(literal_view=False).eval()
    report = graphprune.analyze(model, X)
    group = group_of(report, "conv.weight", 0)
    assert group.prunable and {m.name for m in group.members} >= {"conv.weight", "scale", "out.weight"}
    assert not any(m.name == "order" for g in report.groups for m in g.members)  # indices, not channels
    run_oracle(model, X, groups=1)  # prunes the model itself, in float64
    assert model.scale.shape[0] < 16 and model(X.double()).shape == (2, 4, 8, 8)


# --------------------------------------------------------------------------- fx constants
class MakesConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        shift = torch.tensor([0.5, -0.5, 1.0, 0.0, 0.25, 2.0, -1.0, 0.75]).view(1, 8, 1, 1)
        return self.out(self.conv(x) + shift)


def test_analysis_leaves_no_constant_on_the_model_and_repeats_identically():
    model = MakesConstants().eval()
    before = model_state(model)
    first = graphprune.analyze(model, X)
    second = graphprune.analyze(model, X)
    assert_model_unchanged(model, before)
    assert [g.status for g in first.groups] == [g.status for g in second.groups]
    assert [[m.name for m in g.members] for g in first.groups] == [[m.name for m in g.members] for g in second.groups]
    _blocked_with(first, "conv.weight", 0, "constant created by the tracer")


def test_hooks_registered_for_every_module_block_every_module():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        report = graphprune.analyze(TwoBranches().eval(), X)
    finally:
        handle.remove()
    assert not report.prunable_groups
    assert all("has forward hooks" in reason or reason in ("model input", "reaches output")
               for g in report.groups for reason in g.blocked)


class SideEffects(nn.Module):
    """A forward that needs values (.item()), counts its calls in a buffer, and keeps its last
    activation in a namespace it holds."""

    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.register_buffer("calls", torch.zeros(()))
        self.notes = types.SimpleNamespace()

    def forward(self, x):
        self.calls.add_(1)
        h = self.conv(x)
        self.notes.last = h
        return self.out(h * 2 if h.mean().item() > 100 else h)


def test_analysis_takes_back_what_a_real_run_of_the_forward_leaves():
    model = SideEffects().eval()
    before = model_state(model)
    graphprune.analyze(model, X)
    assert_model_unchanged(model, before)
    assert model.calls.item() == 0 and vars(model.notes) == {}
