"""The public entry points: :func:`analyze` and :func:`prune`."""
from __future__ import annotations

import copy
import math
import numbers
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Union

import numpy as np
import torch
from torch import nn

import tracer
from criteria import Criterion, get_criterion

from .groups import Group, build_groups
from .inputs import resolve_example_inputs
from .planner import plan_removal
from .propagate import Propagation, propagate
from .report import Report
from .surgery import ChannelSurgery

LayerRef = Union[str, nn.Module]


@contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode, then restore every submodule's own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"ratio must be a real number in [0, 1), got {type(ratio).__name__}")
    ratio = float(ratio)
    if math.isnan(ratio) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must lie in [0, 1), got {ratio}")
    return ratio


def _layer_names(model: nn.Module, layers: Iterable[LayerRef], argument: str) -> set[str]:
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    by_id = {id(m): name for name, m in model.named_modules()}
    names, unknown = set(), []
    for layer in layers:
        if isinstance(layer, nn.Module):
            if id(layer) not in by_id:
                unknown.append(type(layer).__name__)
            else:
                names.add(by_id[id(layer)])
        elif isinstance(layer, str):
            if layer not in by_id.values():
                unknown.append(layer)
            names.add(layer)
        else:
            raise TypeError(f"{argument} entries must be module names or modules, got {type(layer).__name__}")
    if unknown:
        raise ValueError(f"{argument} has entries that are not submodules of {type(model).__name__}: {unknown}")
    return names


def _ignore(groups: list[Group], names: set[str]) -> None:
    for group in groups:
        hits = sorted({n for n in names for layer in group.layers() if layer == n or layer.startswith(n + ".") or n == ""})
        if hits:
            group.blocked.append("ignored_layers: " + ", ".join(hits))


def _annotate_channels(state: Propagation, roots: np.ndarray, groups: list[Group]) -> None:
    """Store on each graph node, per tensor dim, ``(group id, index map)`` or None.

    The index map gives the group channel of every position along that dim, as in
    :class:`Member`; multi-output nodes get a tuple of such tuples.
    """
    group_of_root = np.full(roots.size, -1, dtype=np.int64)
    for group in groups:
        group_of_root[group.units] = group.id

    def dims(labels):
        if labels is None:
            return None
        if labels and isinstance(labels[0], np.ndarray):
            return tuple(_dim_channels(ids) for ids in labels)
        return tuple(dims(item) for item in labels)

    def _dim_channels(ids):
        if ids[0] < 0 or group_of_root[roots[ids[0]]] < 0 or (ids < 0).any():
            return None
        group = groups[group_of_root[roots[ids[0]]]]
        return group.id, np.searchsorted(group.units, roots[ids])

    for name, labels in state.labels.items():
        state.graph.nodes[name]["channels"] = dims(labels)


class _Analysis:
    """Everything one analysis produced: report, surgery and the expected output shapes."""

    def __init__(self, model: nn.Module, example_inputs: Any, description: str, leaf_modules, ignored: set[str]):
        graph = tracer.trace(model, example_inputs, leaf_modules)
        state = propagate(graph)
        roots = state.space.all_roots()
        groups = build_groups(state, roots)
        _ignore(groups, ignored)
        _annotate_channels(state, roots, groups)
        self.surgery = ChannelSurgery(state, roots, groups)
        output = next(n for n, a in graph.nodes(data=True) if a["op"] == "output")
        self.expected_output = graph.nodes[output]["value"]
        self.report = Report(type(model).__name__, groups, graph, description)


def _run_analysis(model, example_inputs, leaf_modules, ignored_layers) -> tuple[_Analysis, Any]:
    _check_model(model)
    ignored = _layer_names(model, ignored_layers, "ignored_layers")
    inputs, inferred = resolve_example_inputs(model, example_inputs)
    description = "inferred " + _describe_inputs(inputs) if inferred else _describe_inputs(inputs)
    try:
        return _Analysis(model, inputs, description, leaf_modules, ignored), inputs
    except tracer.InputError as exc:
        if inferred:
            raise ValueError(f"{exc} The inferred input was {_describe_inputs(inputs)}; pass example_inputs.") from exc
        raise ValueError(str(exc)) from exc


def _describe_inputs(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"tensor{tuple(inputs.shape)}"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {_describe_inputs(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(_describe_inputs(v) for v in inputs) + ")"
    return type(inputs).__name__


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[tracer.LeafSpec] = (),
    ignored_layers: Iterable[LayerRef] = (),
) -> Report:
    """Trace ``model`` and report every coupled channel group.

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword
    inputs; when omitted a plausible input is built (see :func:`infer_example_inputs`).
    ``leaf_modules`` (names, classes or modules) are not traced into; their channels are
    blocked unless a rule knows them. ``ignored_layers`` marks groups that touch those
    modules as blocked. The model is not modified; its train/eval flags are restored.
    """
    with eval_mode(model):
        analysis, _ = _run_analysis(model, example_inputs, leaf_modules, ignored_layers)
    return analysis.report


def prune(
    model: nn.Module,
    ratio: float,
    example_inputs: Any = None,
    *,
    criterion: Union[str, Criterion] = "l1",
    ignored_layers: Iterable[LayerRef] = (),
    inplace: bool = True,
    leaf_modules: Iterable[tracer.LeafSpec] = (),
    verify: bool = True,
) -> nn.Module:
    """Remove ``floor(ratio * n)`` channels from every prunable group of ``n`` channels.

    Channels are ranked by ``criterion`` (a name such as ``"l1"`` or a Criterion). With
    ``inplace=False`` a deep copy is pruned and the original is left alone. With
    ``verify=True`` the pruned model is run once on ``example_inputs`` and must produce
    outputs of the original shapes. On any failure the model is restored bit for bit and
    :class:`PruningError` is raised. Returns the pruned model.
    """
    _check_model(model)
    ratio = _check_ratio(ratio)
    criterion = get_criterion(criterion)
    if not inplace:
        model = copy.deepcopy(model)
    with eval_mode(model):
        analysis, inputs = _run_analysis(model, example_inputs, leaf_modules, ignored_layers)
        report = analysis.report
        if not report.prunable_groups:
            warnings.warn(f"{report.model_name} has no prunable channel group; the model is unchanged", stacklevel=2)
            return model
        criterion.prepare(model, report)
        plan = plan_removal(report.groups, ratio, criterion)

        def check_outputs() -> None:
            with torch.no_grad():
                produced = tracer.describe(tracer.call_model(model, inputs))
            if produced != analysis.expected_output:
                raise RuntimeError(f"outputs changed shape: expected {analysis.expected_output}, got {produced}")

        analysis.surgery.prune_groups(plan, verify=check_outputs if verify else None)
    return model
