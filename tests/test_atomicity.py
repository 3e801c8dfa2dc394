"""A prune that fails leaves the model as it was: shapes, values, attributes, gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphprune
import graphprune.analysis.analyzer
import graphprune.session
import graphprune.pruning.surgery
from small_net import assert_consistent, small_net, widths
from conftest import assert_same_state, size_attrs, state_snapshot

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- atomicity
def _prepare_for_atomicity():
    model = small_net()
    model.train()
    F.cross_entropy(model(X), torch.tensor([1, 2])).backward()  # populate .grad
    model.eval()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        reference = model(X)
    return model, grads, reference


def _assert_restored(model, snapshot, attrs, params, grads, reference):
    assert_same_state(model, snapshot)
    assert size_attrs(model) == attrs
    assert all(a is b for a, b in zip(model.parameters(), params)), "parameters were replaced"
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), f"{name}.grad changed"
    with torch.no_grad():
        assert torch.equal(model(X), reference)


def _fail_after(monkeypatch, name: str, calls: int):
    original = getattr(graphprune.pruning.surgery._Transaction, name)
    seen = []

    def failing(self, *args, **kwargs):
        seen.append(args)
        if len(seen) > calls:
            raise RuntimeError(f"injected failure in {name}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(graphprune.pruning.surgery._Transaction, name, failing)
    return seen


@pytest.mark.parametrize("name, calls", [("set_attr", 3), ("shrink", 5)])
def test_failure_in_the_middle_of_surgery_restores_everything(monkeypatch, name, calls):
    model, grads, reference = _prepare_for_atomicity()
    snapshot, attrs, params = state_snapshot(model), size_attrs(model), list(model.parameters())
    seen = _fail_after(monkeypatch, name, calls)
    with pytest.raises(graphprune.PruningError, match=f"model was restored.*injected failure in {name}"):
        graphprune.prune(model, 0.5, X)
    assert len(seen) == calls + 1  # it really failed half-way
    _assert_restored(model, snapshot, attrs, params, grads, reference)


def test_failing_verify_restores_everything():
    model, grads, reference = _prepare_for_atomicity()
    snapshot, attrs, params = state_snapshot(model), size_attrs(model), list(model.parameters())
    report = graphprune.analyze(model, X)
    plan = {g: [0, 1] for g in report.prunable_groups}
    surgery = report.prunable_groups[0]._surgery
    shapes_seen = []

    def verify(removed, filled):
        shapes_seen.append(tuple(model.conv1.weight.shape))
        raise RuntimeError("verification says no")

    with pytest.raises(graphprune.PruningError, match="verification says no") as info:
        surgery.prune_groups(plan, verify=verify)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert shapes_seen == [(14, 3, 3, 3)]  # verify ran on the pruned model
    _assert_restored(model, snapshot, attrs, params, grads, reference)

    # The failed attempt left the surgery usable: the same plan now goes through.
    surgery.prune_groups(plan)
    assert widths(model) == (14, 10, 22)
    assert_consistent(model)
    for p in model.parameters():
        assert p.grad is None or p.grad.shape == p.shape


def test_failing_audit_in_prune_restores_everything(monkeypatch):
    model, grads, reference = _prepare_for_atomicity()
    snapshot, attrs, params = state_snapshot(model), size_attrs(model), list(model.parameters())

    def broken_audit(*args, **kwargs):
        raise RuntimeError("audit crashed")

    monkeypatch.setattr(graphprune.session, "audit", broken_audit)
    with pytest.raises(graphprune.PruningError, match="audit crashed"):
        graphprune.prune(model, 0.5, X)
    _assert_restored(model, snapshot, attrs, params, grads, reference)


# --------------------------------------------------------------------------- isolation
def test_a_pruned_model_that_no_longer_runs_blocks_the_groups_at_the_failing_node(monkeypatch):
    """A size that does not follow the pruning (here: one buffer the surgery is made to
    skip) breaks the pruned model's forward at one node. The audit names that node, blocks
    the groups that flow into it, and prunes the rest."""
    model = small_net()
    skip, shrink = model.bna.running_var, graphprune.pruning.surgery._Transaction.shrink
    monkeypatch.setattr(graphprune.pruning.surgery._Transaction, "shrink",
                        lambda self, tensor, keep: None if tensor is skip else shrink(self, tensor, keep))
    report = graphprune.analyze(model, X)
    graphprune.prune(model, 0.5, X, report=report)
    assert widths(model) == (8, 12, 12)  # the inner width (conva, bna) is kept; the others are halved
    inner = next(g for g in report.groups if g.root == "conva")
    assert inner.blocked == [inner.blocked[0]] and inner.blocked[0].startswith(
        "shape audit: the pruned model no longer runs on the example inputs, which the model took before "
        "pruning (at node 'bna': running_var should contain 6 elements not 12)")
    assert all(not g.blocked for g in report.groups if g.root in ("conv1", "conv3"))
    with torch.no_grad():
        assert model(X).shape == (2, 10)


def test_a_failure_the_audit_cannot_place_is_isolated_by_bisection(monkeypatch):
    """When the audit fails without naming the groups behind it, the plan is bisected in
    trials: the group whose pruning fails alone is blocked, and the others are pruned."""
    from graphprune.pruning.audit import AuditError

    model = small_net()
    report = graphprune.analyze(model, X)
    inner = next(g for g in report.groups if g.root == "conva")
    audit, trials = graphprune.session.audit, []

    def unplaced(model, inputs, leaves, state, roots, removed, filled=True, **options):
        trials.append(filled)
        if removed[inner.units].any():
            raise AuditError("the pruned model breaks somewhere (injected)", np.zeros(0, dtype=np.int64))
        audit(model, inputs, leaves, state, roots, removed, filled, **options)

    monkeypatch.setattr(graphprune.session, "audit", unplaced)
    graphprune.prune(model, 0.5, X, report=report)
    assert widths(model) == (8, 12, 12)
    assert inner.blocked == ["shape audit: the pruned model breaks somewhere (injected)"]
    assert len(trials) > 2  # the prune, the trials of the bisection, the prune again
