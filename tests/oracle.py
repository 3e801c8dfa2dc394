"""The dead-channel oracle: pruning channels whose consumers ignore them must not change outputs.

A channel that no consumer reads is dead: removing it (from its producers, norms, scales and
consumers alike) must leave every output unchanged. The oracle makes random channels dead in a
copy of the model by zeroing the consumer ("in") weights that read them and, by default, the
producer ("out") rows that write them and the parameters read directly (role "param": a
weight a matmul reads, ``x @ self.weight.T``, a scale, a position embedding), so that a
weightless consumer such as the q·k product of attention also sees zeros; it prunes exactly
those channels from the model itself through the engine's surgery, and compares both in
float64. A wrong group (a wrong index map, a wrong
offset in a concat, a member that should not have been coupled) shows up as a mismatch or as
a forward error.

With ``zero_producers=False`` only consumers are zeroed. That stricter form also catches a
consumer missing from its group (its columns stay live in the copy but are cut from the model);
use it on models whose channels are only read by weighted layers (no attention products).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

import graphprune
from graphprune.tracer import call_model


def flat_outputs(value: Any) -> list:
    """Every tensor in a (nested) output, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in flat_outputs(value[k])]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat_outputs(v)]
    return []


def to_double(inputs: Any) -> Any:
    """Floating tensors in ``inputs`` cast to float64 (integer inputs are left alone)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.double() if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: to_double(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_double(v) for v in inputs)
    return inputs


def _choose(group: graphprune.Group, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Random channels of ``group``, sparing one channel of every member so none is emptied."""
    spared: set = set()
    for member in group.members:
        channels = np.unique(member.index_map)
        if not spared.intersection(channels.tolist()):
            spared.add(int(rng.choice(channels)))
    available = np.setdiff1d(np.arange(group.size), np.fromiter(spared, dtype=np.int64))
    if not available.size:
        return available
    count = min(available.size, max(1, int(fraction * group.size)))
    return np.sort(rng.choice(available, count, replace=False))


def dead_channel_oracle(
    model: nn.Module,
    example_inputs: Any,
    *,
    seed: int = 0,
    fraction: float = 0.3,
    max_groups: Optional[int] = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    zero_producers: bool = True,
    assumed: bool = False,
    **analyze_options: Any,
) -> dict:
    """Run the oracle on ``model`` (converted to float64 and eval mode, then pruned in place).

    Zeroes the consumers (and with ``zero_producers`` the producers) of random channels of
    random exact groups in a deep copy, prunes exactly those channels from ``model`` and
    compares outputs. Returns a summary dict and
    raises AssertionError on a mismatch (or whatever the pruned model raises in forward).
    """
    rng = np.random.default_rng(seed)
    model = model.double().eval()
    inputs = to_double(example_inputs)
    report = graphprune.analyze(model, inputs, **analyze_options)
    # Groups whose sizes only the audit confirms (torch.export's numbers) are left out, unless
    # ``assumed``: for a model whose numbers are known to be read off shapes.
    candidates = [g for g in report.prunable_groups if g.exact and (assumed or not g.assumptions)]
    if max_groups is not None and len(candidates) > max_groups:
        candidates = [candidates[i] for i in sorted(rng.choice(len(candidates), max_groups, replace=False))]
    zeroed = copy.deepcopy(model)
    plan = {}
    for group in candidates:
        chosen = _choose(group, rng, fraction)
        if not chosen.size:
            continue
        plan[group] = chosen
        for member in group.members:
            if member.role != "in" and not (zero_producers and member.role in ("out", "param")):
                continue
            tensor = getattr(zeroed.get_submodule(member.module), member.param)
            positions = np.flatnonzero(np.isin(member.index_map, chosen))
            with torch.no_grad():
                tensor.index_fill_(member.dim, torch.as_tensor(positions, device=tensor.device), 0.0)
    params_before = sum(p.numel() for p in model.parameters())
    if plan:
        report.session.surgery.prune_groups(plan)  # the raw surgery: no audit may hide a wrong rule
    with torch.no_grad():
        expected = flat_outputs(call_model(zeroed, inputs))
        produced = flat_outputs(call_model(model, inputs))
    assert len(expected) == len(produced), f"{len(produced)} outputs != {len(expected)}"
    for e, p in zip(expected, produced):
        assert e.shape == p.shape, f"output shape {tuple(p.shape)} != {tuple(e.shape)}"
        if not torch.allclose(e, p, rtol=rtol, atol=atol):
            raise AssertionError(f"dead-channel oracle failed: max abs diff {(e - p).abs().max().item():.3e}")
    return {
        "groups_tested": len(plan),
        "channels_removed": int(sum(len(c) for c in plan.values())),
        "exact_groups": len(candidates),
        "prunable_groups": len(report.prunable_groups),
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
    }
