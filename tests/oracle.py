"""The dead-channel oracle: pruning channels whose consumers ignore them must not change outputs."""
from __future__ import annotations

import copy
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

import graphprune
from tracer import call_model


def _flat_outputs(value: Any) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_outputs(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat_outputs(v)]
    return []


def _to_double(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.double() if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _to_double(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_double(v) for v in inputs)
    return inputs


def dead_channel_oracle(
    model: nn.Module,
    example_inputs: Any,
    *,
    seed: int = 0,
    fraction: float = 0.3,
    max_groups: Optional[int] = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> dict:
    """Zero the consumers of random channels of random exact groups in a copy, prune exactly
    those channels from ``model`` and compare outputs (float64). Returns a summary dict and
    raises AssertionError on a mismatch."""
    rng = np.random.default_rng(seed)
    model = model.double().eval()
    inputs = _to_double(example_inputs)
    report = graphprune.analyze(model, inputs)
    candidates = [g for g in report.prunable_groups if g.exact]
    if max_groups is not None and len(candidates) > max_groups:
        candidates = [candidates[i] for i in sorted(rng.choice(len(candidates), max_groups, replace=False))]
    zeroed = copy.deepcopy(model)
    plan = {}
    for group in candidates:
        count = min(group.size - 1, max(1, int(fraction * group.size)))
        chosen = np.sort(rng.choice(group.size, count, replace=False))
        plan[group] = chosen
        for member in group.members:
            if member.role != "in":
                continue
            tensor = getattr(zeroed.get_submodule(member.module), member.param)
            positions = np.flatnonzero(np.isin(member.index_map, chosen))
            with torch.no_grad():
                tensor.index_fill_(member.dim, torch.as_tensor(positions, device=tensor.device), 0.0)
    params_before = sum(p.numel() for p in model.parameters())
    report.groups[0]._surgery.prune_groups(plan) if plan else None
    with torch.no_grad():
        expected = _flat_outputs(call_model(zeroed, inputs))
        produced = _flat_outputs(call_model(model, inputs))
    assert len(expected) == len(produced)
    for e, p in zip(expected, produced):
        assert e.shape == p.shape, f"output shape {tuple(p.shape)} != {tuple(e.shape)}"
        if not torch.allclose(e, p, rtol=rtol, atol=atol):
            raise AssertionError(f"dead-channel oracle failed: max abs diff {(e - p).abs().max().item():.3e}")
    return {
        "groups_tested": len(plan),
        "exact_groups": len(candidates),
        "prunable_groups": len(report.prunable_groups),
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
    }
