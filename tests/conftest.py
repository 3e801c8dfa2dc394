"""Shared fixtures: every test starts from the same random state."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

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


SIZE_ATTRS = (
    "in_channels", "out_channels", "groups", "num_features", "num_channels", "num_groups",
    "in_features", "out_features", "normalized_shape", "num_parameters", "embedding_dim",
)


def size_attrs(model: torch.nn.Module) -> dict:
    """Every size attribute of every submodule, keyed by (module name, attribute)."""
    return {
        (name, attr): getattr(module, attr)
        for name, module in model.named_modules()
        for attr in SIZE_ATTRS
        if hasattr(module, attr)
    }


def training_flags(model: torch.nn.Module) -> dict:
    return {name: module.training for name, module in model.named_modules()}


def group_of(report, name: str, dim: int):
    """The one group of ``report`` with a member ``name`` (``module.param``) along ``dim``."""
    found = [g for g in report.groups for m in g.members if m.name == name and m.dim == dim]
    assert len(found) == 1, f"{name} dim {dim} is in {len(found)} groups"
    return found[0]
