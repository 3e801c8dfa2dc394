"""Shared fixtures: every test starts from the same random state."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import graphprune
from graphprune.tracer import call_model
from oracle import dead_channel_oracle

# The suite runs many tiny forwards (float64 oracles, 64x64 inputs). On a small shared CPU,
# intra-op threads mostly wait on each other: one thread is several times faster here.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_snapshot(model: torch.nn.Module) -> dict:
    """Copies of every parameter and buffer, keyed by state_dict name."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, snapshot: dict) -> None:
    """The model's state_dict has the snapshot's keys and bit-identical tensors (shape, dtype, values)."""
    state = model.state_dict()
    assert list(state) == list(snapshot)
    for key, before in snapshot.items():
        after = state[key]
        assert after.shape == before.shape, f"{key}: shape {tuple(after.shape)} != {tuple(before.shape)}"
        assert after.dtype == before.dtype, f"{key}: dtype {after.dtype} != {before.dtype}"
        assert torch.equal(after, before), f"{key}: values changed"


def model_state(model: torch.nn.Module) -> dict:
    """Everything graphprune must leave as it was after a failure: every parameter's and
    buffer's values (copied), object, gradient (copied) and requires_grad, every module's
    training flag, children, hooks and other attributes (values, or identities of objects)."""
    state = {"tensors": {}, "modules": {}}
    for name, module in model.named_modules():
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                grad = None if tensor.grad is None else tensor.grad.detach().clone()
                state["tensors"][(name, key)] = (tensor, tensor.detach().clone(), grad, tensor.requires_grad)
        attrs = {}
        for key, value in vars(module).items():
            if isinstance(value, dict):
                value = dict(value)  # parameters, buffers, children and hooks: the objects, by identity
            attrs[key] = value
        state["modules"][name] = (module, attrs)
    return state


def assert_model_unchanged(model: torch.nn.Module, before: dict) -> None:
    """``model`` is bit for bit as :func:`model_state` recorded it."""
    after = model_state(model)
    assert list(after["modules"]) == list(before["modules"]), "modules were added or removed"
    for name, (module, attrs) in before["modules"].items():
        now_module, now = after["modules"][name]
        assert now_module is module, f"module {name!r} was replaced"
        assert list(now) == list(attrs), f"{name!r}: attributes {sorted(set(now) ^ set(attrs))} added or removed"
        for key, value in attrs.items():
            if isinstance(value, torch.Tensor):
                assert now[key] is value, f"{name}.{key} was replaced"
            else:
                assert now[key] is value or now[key] == value, f"{name}.{key}: {value!r} -> {now[key]!r}"
    assert list(after["tensors"]) == list(before["tensors"])
    for key, (tensor, values, grad, requires_grad) in before["tensors"].items():
        now_tensor, now_values, now_grad, now_requires_grad = after["tensors"][key]
        assert now_tensor is tensor, f"{key} was replaced"
        assert now_values.dtype == values.dtype and now_values.shape == values.shape, f"{key}: shape or dtype changed"
        assert values.is_meta or torch.equal(now_values, values), f"{key}: values changed"  # meta: no values
        assert (now_grad is None) == (grad is None) and (grad is None or torch.equal(now_grad, grad)), f"{key}: grad changed"
        assert now_requires_grad == requires_grad, f"{key}: requires_grad changed"


def size_attrs(model: torch.nn.Module) -> dict:
    """Every size and count attribute (graphprune.sizes) of every submodule, keyed by (module name, attribute)."""
    from graphprune.analysis.sizes import size_attribute_names

    return {
        (name, attr): getattr(module, attr)
        for name, module in model.named_modules()
        for attr in size_attribute_names(module)
        if hasattr(module, attr)
    }


def randomize_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm2d non-trivial statistics and affine parameters, so that a
    misplaced channel shows in the outputs; returns ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def failing_allocation(monkeypatch, at: int) -> list:
    """Make the surgery's ``at``-th allocation of new storage run out of memory; returns the
    device type of every allocation asked for."""
    from graphprune.pruning import surgery

    allocate, calls = surgery._empty_selection, []

    def failing(data, index):
        calls.append(data.device.type)
        if len(calls) == at:
            raise torch.OutOfMemoryError("out of memory (injected)")
        return allocate(data, index)

    monkeypatch.setattr(surgery, "_empty_selection", failing)
    return calls


def training_flags(model: torch.nn.Module) -> dict:
    return {name: module.training for name, module in model.named_modules()}


def group_of(report, name: str, dim: int):
    """The one group of ``report`` with a member ``name`` (``module.param``) along ``dim``."""
    found = [g for g in report.groups for m in g.members if m.name == name and m.dim == dim]
    assert len(found) == 1, f"{name} dim {dim} is in {len(found)} groups"
    return found[0]


# ----- helpers of the per-rule tests (test_rules*.py, test_blocking.py)
def member(group, name: str, dim: int):
    """The one member of ``group`` that is ``name`` (``module.param``) along ``dim``."""
    found = [m for m in group.members if m.name == name and m.dim == dim]
    assert len(found) == 1, f"{name} dim {dim} is not a member of group {group.id}"
    return found[0]


def names(group) -> set:
    """``(name, dim, role)`` of every member."""
    return {(m.name, m.dim, m.role) for m in group.members}


def maps(group) -> dict:
    """Every member's index map as a list, keyed by ``(name, dim)``."""
    return {(m.name, m.dim): m.index_map.tolist() for m in group.members}


def run_oracle(model: torch.nn.Module, inputs, groups: int) -> dict:
    """The dead-channel oracle on ``model``, which must test ``groups`` groups and shrink it."""
    # Consumers only: also catches a consumer missing from its group (none of these models
    # has a weightless consumer such as an attention product).
    summary = dead_channel_oracle(model, inputs, seed=0, zero_producers=False)
    assert summary["groups_tested"] == groups
    assert summary["params_after"] < summary["params_before"]
    return summary


def assert_output_blocked(report, layer: str) -> None:
    """``layer``'s output channels are blocked because they are the model's output."""
    head = group_of(report, f"{layer}.weight", 0)
    assert head.blocked == ["reaches output"]
    assert not head.prunable
    assert head.status == "blocked: reaches output"


# ----- helpers of the command-line tests
def run_cli(capsys, argv: list) -> tuple:
    """``(exit code, stdout, stderr)`` of ``graphprune`` with ``argv``, run in this process."""
    from graphprune.cli.app import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stderr_lines(err: str) -> list:
    """The non-blank lines of ``err``."""
    return [line for line in err.splitlines() if line.strip()]


def trained_and_reloaded(model: torch.nn.Module, build, inputs, layer: torch.nn.Module, path) -> torch.nn.Module:
    """Run a training step on the pruned ``model`` (every parameter of ``layer`` gets a gradient
    of its shape), save it to ``path`` and load it into ``build()``: the loaded model, whose
    outputs are asserted equal to ``model``'s."""
    model.train()
    call_model(model, inputs).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in layer.parameters())
    model.eval()
    graphprune.save(model, path)
    fresh = graphprune.load(build().eval(), path)
    with torch.no_grad():
        assert torch.equal(call_model(fresh, inputs), call_model(model, inputs))
    return fresh
