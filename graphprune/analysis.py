"""One analysis of a model (trace, propagate, group) and the audited application of a plan."""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Iterable, Mapping, Union

import numpy as np
import torch
from torch import nn

import tracer
from tracer.devices import describe_value

from .audit import AuditError, audit
from .channels import per_array
from .groups import Group, build_groups
from .inputs import resolve_example_inputs
from .propagate import Propagation, propagate
from .report import Report
from .rules import has_module_rule
from .surgery import ChannelSurgery, PruningError
from .validation import check_model

_AUDIT_RETRIES = 3

LayerRef = Union[str, nn.Module]


@contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode, then restore every submodule's own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if any(training for _, training in flags):
            model.eval()
        yield
    finally:
        for module, training in flags:
            if module.training != training:
                module.training = training


@contextmanager
def gc_paused(pause: bool = True):
    """Pause Python's cyclic garbage collector (if ``pause``), then restore it: tracing
    allocates so many small objects that it triggers full collections, each of which
    rescans every object the process holds (a large model's modules and tensors among them)."""
    enabled = gc.isenabled()
    try:
        if pause:
            gc.disable()
        yield
    finally:
        if enabled:
            gc.enable()


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

    @per_array
    def _dim_channels(ids):
        if not ids.size or ids[0] < 0 or group_of_root[roots[ids[0]]] < 0 or (ids < 0).any():
            return None
        group = groups[group_of_root[roots[ids[0]]]]
        return group.id, np.searchsorted(group.units, roots[ids])

    for name, labels in state.labels.items():
        state.graph.nodes[name]["channels"] = dims(labels)


class Analysis:
    """Everything one analysis produced (report and surgery) and what it was made from."""

    def __init__(self, model: nn.Module, example_inputs: Any, description: str, leaf_modules, ignored: set[str], prune_heads: bool):
        graph = tracer.trace(model, example_inputs, traced_leaves(leaf_modules))
        state = propagate(graph, prune_heads)
        roots = state.space.all_roots()
        groups = build_groups(state, roots)
        _ignore(groups, ignored)
        _annotate_channels(state, roots, groups)
        self.surgery = ChannelSurgery(state, roots, groups)
        self.model = model
        self.inputs = example_inputs  # as resolved: inferred when the caller gave none
        self.leaf_modules = list(leaf_modules)
        self.ignored_layers = ignored
        self.prune_heads = prune_heads
        self.fingerprint = fingerprint(model)
        self.report = Report(type(model).__name__, groups, graph, description, analysis=self)


def fingerprint(model: nn.Module) -> tuple:
    """Identity and shape of every module, parameter and buffer: changes when the model is
    pruned or its layers are replaced, not when weights are updated in place."""
    modules, tensors = [], []
    for name, module in model.named_modules(remove_duplicate=False):
        modules.append((name, id(module)))
        for registry in (module._parameters, module._buffers):
            tensors.extend((name, key, id(t), t.shape, t.dtype, t.device) for key, t in registry.items() if t is not None)
    return tuple(modules), tuple(tensors)


def run_analysis(model, example_inputs, leaf_modules, ignored_layers, prune_heads=False) -> Analysis:
    """Check the arguments and analyse ``model``; the resolved inputs are ``.inputs``."""
    check_model(model)
    if not isinstance(prune_heads, bool):
        raise TypeError(f"prune_heads must be True or False, got {type(prune_heads).__name__}")
    ignored = _layer_names(model, ignored_layers, "ignored_layers")
    inputs, inferred = resolve_example_inputs(model, example_inputs)
    _check_devices(model, inputs)
    description = "inferred " + describe_inputs(inputs) if inferred else describe_inputs(inputs)
    try:
        return Analysis(model, inputs, description, leaf_modules, ignored, prune_heads)
    except tracer.InputError as exc:
        if inferred:
            raise ValueError(f"{exc} The inferred input was {describe_inputs(inputs)}; pass example_inputs.") from exc
        raise ValueError(str(exc)) from exc


def _input_tensors(inputs: Any) -> list:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else []
    return [t for v in values for t in _input_tensors(v)]


def _check_devices(model: nn.Module, inputs: Any) -> None:
    """Meta-device models hold no values to rank; inputs must live on the model's device."""
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    if any(d.type == "meta" for d in devices):
        raise ValueError(
            f"{type(model).__name__} has parameters on the meta device, which hold no values; "
            "materialise it first (model.to_empty(device=...) and load its weights)"
        )
    input_devices = {t.device for t in _input_tensors(inputs)}
    if len(devices) == 1 and input_devices and input_devices != devices:
        raise ValueError(
            f"example_inputs are on {', '.join(sorted(map(str, input_devices)))} but the model is on "
            f"{next(iter(devices))}; move them to the model's device"
        )


def describe_inputs(inputs: Any) -> str:
    """``tensor(1, 3, 224, 224)``, ``(…, …)``, ``[…]`` or ``{key: …}``: the shapes of example inputs."""
    return describe_value(inputs, dtypes=False)


def traced_leaves(leaf_modules: Iterable[tracer.LeafSpec]) -> list:
    """The user's leaf modules plus every module the rule table knows (never traced into)."""
    return [*leaf_modules, has_module_rule]


def apply_audited(model, inputs, leaf_modules, surgery: ChannelSurgery, plan: dict, verify: bool,
                  on_commit=None) -> None:
    """Apply ``plan``; with ``verify``, audit the shapes and retry without the groups blamed.
    ``on_commit`` is passed to :meth:`ChannelSurgery.prune_groups`."""

    def check(removed: np.ndarray, filled: bool) -> None:
        audit(model, inputs, traced_leaves(leaf_modules), surgery.state, surgery.roots, removed, filled)

    for _ in range(_AUDIT_RETRIES):
        try:
            surgery.prune_groups(plan, verify=check if verify else None, on_commit=on_commit)
            return
        except PruningError as exc:
            cause = exc.__cause__
            blamed = [g for g in plan if isinstance(cause, AuditError) and np.isin(g.units, cause.suspects).any()]
            if not blamed:
                raise
            for group in blamed:
                group.blocked.append(f"shape audit: {cause}")
            plan = {g: index for g, index in plan.items() if g not in blamed}
    raise PruningError("pruning kept failing the shape audit; the model was restored")
