"""Weights computed by ``torch.nn.utils.parametrizations.weight_norm`` and ``spectral_norm``
prune through the tensors they are computed from (g and v; the original weight and the power
iteration's u and v), under both front-ends; the pruned model runs, trains, saves and loads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import group_of
from oracle import dead_channel_oracle
from torch import nn
from torch.nn.utils import parametrizations

import graphprune

X = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))


class Normed(nn.Module):
    """Convolutions and a linear head, each weight parametrized by ``kind`` (``which`` of them)."""

    def __init__(self, kind: str, which: str = "abcl"):
        super().__init__()
        wrap = getattr(parametrizations, kind)
        layers = {"a": nn.Conv2d(3, 8, 3), "b": nn.Conv2d(8, 8, 3), "c": nn.Conv2d(8, 6, 1), "l": nn.Linear(6, 5)}
        for name, layer in layers.items():
            setattr(self, name, wrap(layer) if name in which else layer)

    def forward(self, x):
        return self.l(self.c(F.relu(self.b(F.relu(self.a(x))))).mean((2, 3)))


def test_weight_norm_prunes_g_and_v_exactly():
    report = graphprune.analyze(Normed("weight_norm").eval(), X)
    group = group_of(report, "a.parametrizations.weight.original1", 0)
    assert group.prunable and group.exact
    assert {("a.parametrizations.weight.original0", 0), ("b.parametrizations.weight.original1", 1)} <= {
        (m.name, m.dim) for m in group.members}
    # zeroing a producer's g and v rows would make 0/0: the consumers' columns make the channels dead
    summary = dead_channel_oracle(Normed("weight_norm"), X, capture="fx", zero_producers=False)
    assert summary["groups_tested"] == 3


def test_spectral_norm_prunes_its_weight_and_vectors_and_rows_are_approximate():
    report = graphprune.analyze(Normed("spectral_norm").eval(), X)
    rows = group_of(report, "a.parametrizations.weight.original", 0)
    assert rows.prunable and not rows.exact and any("σ" in note for note in rows.notes)
    members = {(m.name, m.dim) for m in rows.members}
    assert {("a.parametrizations.weight.0._u", 0), ("b.parametrizations.weight.0._v", 0)} <= members
    for which in ("b", "l"):  # a plain producer, a spectral-normed consumer: exact
        assert dead_channel_oracle(Normed("spectral_norm", which), X)["groups_tested"] >= 2


def test_weight_norm_under_export_is_one_op_with_a_rule():
    class Head(nn.Module):  # the normed layer consumes a group it does not produce: no 0/0 to zero
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), parametrizations.weight_norm(nn.Conv2d(8, 4, 1))

        def forward(self, x):
            return self.b(F.relu(self.a(x)))

    summary = dead_channel_oracle(Head(), X, capture="export")
    assert summary["groups_tested"] == 1 and summary["params_after"] < summary["params_before"]


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_pruned_parametrized_models_run_train_and_round_trip(kind, capture, tmp_path):
    model = Normed(kind).eval()
    before = sum(p.numel() for p in model.parameters())
    graphprune.prune(model, 0.5, X, capture=capture)
    # torch.export writes spectral_norm's power iteration out as ops (mv, vdot) that block
    blocked = (kind, capture) == ("spectral_norm", "export")
    assert model.b.out_channels == (8 if blocked else 4)
    assert (sum(p.numel() for p in model.parameters()) < before) is not blocked
    assert model(X).shape == (2, 5)
    model.train()
    model(X).sum().backward()
    model.eval()
    graphprune.save(model, tmp_path / "m.safetensors")
    loaded = graphprune.load(Normed(kind).eval(), tmp_path / "m.safetensors")
    assert torch.equal(loaded(X), model(X))
