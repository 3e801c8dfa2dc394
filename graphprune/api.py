"""The public entry points: :func:`analyze` and :func:`prune`."""
from __future__ import annotations

import copy
import fnmatch
import gc
import math
import numbers
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

import tracer
from criteria import Criterion, get_criterion

from .budget import PlanOptions, PruneResult, run_pruning
from .audit import AuditError, audit
from .groups import Group, build_groups
from .inputs import resolve_example_inputs
from .planner import check_ratio_value
from .propagate import Propagation, propagate
from .report import Report
from .rules import has_module_rule
from .surgery import ChannelSurgery, PruningError
from .validation import check_int, check_model

_AUDIT_RETRIES = 3

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


@contextmanager
def gc_paused(pause: bool = True):
    """Pause Python's cyclic garbage collector (if ``pause``), then restore it: tracing
    allocates so many small objects that it triggers full collections, each of which
    rescans every object the process holds (a large model's modules and tensors among them)."""
    enabled = gc.isenabled()
    if pause:
        gc.disable()
    try:
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

    def _dim_channels(ids):
        if not ids.size or ids[0] < 0 or group_of_root[roots[ids[0]]] < 0 or (ids < 0).any():
            return None
        group = groups[group_of_root[roots[ids[0]]]]
        return group.id, np.searchsorted(group.units, roots[ids])

    for name, labels in state.labels.items():
        state.graph.nodes[name]["channels"] = dims(labels)


class _Analysis:
    """Everything one analysis produced: report, surgery and the expected output shapes."""

    def __init__(self, model: nn.Module, example_inputs: Any, description: str, leaf_modules, ignored: set[str], prune_heads: bool):
        graph = tracer.trace(model, example_inputs, traced_leaves(leaf_modules))
        state = propagate(graph, prune_heads)
        roots = state.space.all_roots()
        groups = build_groups(state, roots)
        _ignore(groups, ignored)
        _annotate_channels(state, roots, groups)
        self.surgery = ChannelSurgery(state, roots, groups)
        output = next(n for n, a in graph.nodes(data=True) if a["op"] == "output")
        self.expected_output = graph.nodes[output]["value"]
        self.report = Report(type(model).__name__, groups, graph, description)


def _run_analysis(model, example_inputs, leaf_modules, ignored_layers, prune_heads=False) -> tuple[_Analysis, Any]:
    check_model(model)
    if not isinstance(prune_heads, bool):
        raise TypeError(f"prune_heads must be True or False, got {type(prune_heads).__name__}")
    ignored = _layer_names(model, ignored_layers, "ignored_layers")
    inputs, inferred = resolve_example_inputs(model, example_inputs)
    _check_devices(model, inputs)
    description = "inferred " + _describe_inputs(inputs) if inferred else _describe_inputs(inputs)
    try:
        return _Analysis(model, inputs, description, leaf_modules, ignored, prune_heads), inputs
    except tracer.InputError as exc:
        if inferred:
            raise ValueError(f"{exc} The inferred input was {_describe_inputs(inputs)}; pass example_inputs.") from exc
        raise ValueError(str(exc)) from exc


def _input_tensors(inputs: Any) -> list:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else []
    return [t for v in values for t in _input_tensors(v)]


def _check_devices(model: nn.Module, inputs: Any) -> None:
    """Meta-device models hold no values to rank; inputs must live on the model's device."""
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
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
    prune_heads: bool = False,
) -> Report:
    """Trace ``model`` and report every coupled channel group.

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword
    inputs; when omitted a plausible input is built (see :func:`infer_example_inputs`).
    ``leaf_modules`` (names, classes or modules) are not traced into; their channels are
    blocked unless a rule knows them. ``ignored_layers`` marks groups that touch those
    modules as blocked. With ``prune_heads`` attention heads are whole channels (``num_heads``
    shrinks); by default every head keeps the same width and ``head_dim`` shrinks. The model
    is not modified; its train/eval flags are restored.
    """
    check_model(model)
    with eval_mode(model), gc_paused():
        analysis, _ = _run_analysis(model, example_inputs, leaf_modules, ignored_layers, prune_heads)
    return analysis.report


def traced_leaves(leaf_modules: Iterable[tracer.LeafSpec]) -> list:
    """The user's leaf modules plus every module the rule table knows (never traced into)."""
    return [*leaf_modules, has_module_rule]


def apply_audited(model, inputs, leaf_modules, surgery: ChannelSurgery, plan: dict, verify: bool) -> None:
    """Apply ``plan``; with ``verify``, audit the shapes and retry without the groups blamed."""

    def check(removed: np.ndarray) -> None:
        audit(model, inputs, traced_leaves(leaf_modules), surgery.state, surgery.roots, removed)

    for _ in range(_AUDIT_RETRIES):
        try:
            surgery.prune_groups(plan, verify=check if verify else None)
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


def _check_ratio_spec(model: nn.Module, ratio: Any) -> Union[float, dict, None]:
    """None, a float in [0, 1), or a mapping from module names / fnmatch globs to such floats."""
    if ratio is None:
        return None
    if not isinstance(ratio, Mapping):
        return check_ratio_value(ratio)
    if not ratio:
        raise ValueError("ratio mapping is empty; give at least one module name or glob")
    names = [name for name, _ in model.named_modules() if name]
    checked, unmatched = {}, []
    for key, value in ratio.items():
        if not isinstance(key, str):
            raise TypeError(f"ratio mapping keys must be module names or globs, got {type(key).__name__}")
        try:
            checked[key] = check_ratio_value(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"ratio[{key!r}]: {exc}") from None
        if key not in names and not fnmatch.filter(names, key):
            unmatched.append(key)
    if unmatched:
        raise ValueError(f"ratio has keys that name no submodule of {type(model).__name__}: {unmatched}")
    return checked


def _check_fraction(value: Any, name: str, low_open: bool = True, high_closed: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = (value > 0.0 if low_open else value >= 0.0) and (value <= 1.0 if high_closed else value < 1.0)
    if math.isnan(value) or not ok:
        interval = ("(" if low_open else "[") + "0, 1" + ("]" if high_closed else ")")
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def _check_planning(model, ratio, global_ranking, max_ratio, round_to, steps, schedule, targets, tolerance, return_result):
    ratio = _check_ratio_spec(model, ratio)
    given = {name: value for name, value in targets.items() if value is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one budget, got {', '.join('target_' + n for n in given)}")
    target = None
    if given:
        (metric, value), = given.items()
        target = (metric, _check_fraction(value, f"target_{metric}"))
        if ratio is not None:
            raise ValueError(f"give either ratio or target_{metric}, not both: the budget search chooses the ratio")
    elif ratio is None:
        raise ValueError("prune needs a ratio or a budget (target_flops, target_params or target_latency)")
    for flag, name in ((global_ranking, "global_ranking"), (return_result, "return_result")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {type(flag).__name__}")
    if global_ranking and isinstance(ratio, dict):
        raise ValueError("global_ranking needs a single float ratio, not a per-layer mapping")
    if max_ratio is not None:
        max_ratio = _check_fraction(max_ratio, "max_ratio", high_closed=False)
    if round_to is not None:
        round_to = check_int(round_to, "round_to", 1)
    steps = check_int(steps, "steps", 1)
    if not (schedule in ("linear", "geometric") or callable(schedule)):
        raise ValueError(f"schedule must be 'linear', 'geometric' or a callable(step, steps), got {schedule!r}")
    tolerance = _check_fraction(tolerance, "tolerance", high_closed=False)
    options = PlanOptions(global_ranking, max_ratio, round_to, steps, schedule, tolerance)
    return ratio, target, options


def prune(
    model: nn.Module,
    ratio: Union[float, Mapping[str, float], None] = None,
    example_inputs: Any = None,
    *,
    criterion: Union[str, Criterion] = "l1",
    ignored_layers: Iterable[LayerRef] = (),
    inplace: bool = True,
    leaf_modules: Iterable[tracer.LeafSpec] = (),
    verify: bool = True,
    prune_heads: bool = False,
    global_ranking: bool = False,
    max_ratio: Optional[float] = None,
    round_to: Optional[int] = None,
    steps: int = 1,
    schedule: Union[str, Callable[[int, int], float]] = "linear",
    target_flops: Optional[float] = None,
    target_params: Optional[float] = None,
    target_latency: Optional[float] = None,
    tolerance: float = 0.02,
    return_result: bool = False,
) -> Union[nn.Module, PruneResult]:
    """Remove ``floor(ratio * n)`` channels from every prunable group of ``n`` channels.

    Channels are ranked by ``criterion`` (a name such as ``"l1"`` or a Criterion). With
    ``inplace=False`` a deep copy is pruned and the original is left alone. With
    ``verify=True`` (default) the pruned model is traced again and every tensor must have
    the shape the analysis predicts, outputs unchanged; groups that fail this audit are
    blocked (with the reason) and dropped from the plan. On any other failure the model is
    restored bit for bit and :class:`PruningError` is raised. Returns the pruned model.

    Planning options (see :mod:`graphprune.planner` and :mod:`graphprune.budget`):

    * ``ratio`` may be a mapping ``{module name or fnmatch glob: ratio}``; a group takes the
      ratio of the first key naming one of its producer layers (exact names first), and
      groups that no key names are left alone (use ``"*"`` for a default);
    * ``global_ranking=True``: scores normalised per group (divided by their mean) are
      ranked across groups and ``floor(ratio * total channels)`` go, each group losing at
      most ``max_ratio`` (default 0.9) of its channels and never all of them;
    * ``max_ratio``: the largest fraction of any group that may go (default: 0.9 with
      ``global_ranking`` and as the top of a budget search, no limit otherwise);
    * ``round_to=N``: every pruned group keeps a multiple of ``N`` channels;
    * ``steps=n``: prune in ``n`` steps, re-analysing and re-scoring the pruned model before
      each; ``schedule`` is ``"linear"`` (equal shares), ``"geometric"`` (the same fraction
      of what is left each step) or ``schedule(step, steps) -> share of the total done``;
    * ``target_flops`` / ``target_params`` / ``target_latency`` (instead of ``ratio``): the
      fraction of the original FLOPs (``FlopCounterMode``), parameters, or latency (on the
      model's device with ``example_inputs``) to keep. The uniform ratio (or the global one
      with ``global_ranking``, at most ``max_ratio``) is searched until the pruned model
      lands within ``tolerance`` (relative, default 2%) of the target; otherwise the closest
      model is kept and a :class:`BudgetWarning` is issued. The achieved value is logged on
      the ``"graphprune"`` logger.

    With ``return_result=True`` a :class:`PruneResult` is returned instead of the model: its
    ``model`` is the pruned model, ``achieved`` the budget metric reached as a fraction of
    the original, ``before`` / ``after`` the FLOPs and parameter counts, ``steps`` one
    :class:`StepResult` per step. If a step of a multi-step prune fails, the model is
    restored to its state before the first step.
    """
    check_model(model)
    ratio, target, options = _check_planning(
        model, ratio, global_ranking, max_ratio, round_to, steps, schedule,
        {"flops": target_flops, "params": target_params, "latency": target_latency}, tolerance, return_result,
    )
    criterion = get_criterion(criterion)
    if not inplace:
        model = copy.deepcopy(model)
    with eval_mode(model), gc_paused(pause=not criterion.requires_data):  # a data pass may run long
        analysis, inputs = _run_analysis(model, example_inputs, leaf_modules, ignored_layers, prune_heads)
        report = analysis.report
        if not report.prunable_groups:
            warnings.warn(f"{report.model_name} has no prunable channel group; the model is unchanged", stacklevel=2)
            if return_result:
                return PruneResult(model, target and target[0], target and target[1], None, target is None, {}, {}, [])
            return model

        def apply(current: _Analysis, plan: dict) -> None:
            apply_audited(model, inputs, leaf_modules, current.surgery, plan, verify)

        def analyse(current_model: nn.Module) -> _Analysis:
            return _run_analysis(current_model, inputs, leaf_modules, ignored_layers, prune_heads)[0]

        result = run_pruning(
            model, analysis, inputs, criterion, ratio=ratio, target=target, options=options,
            analyse=analyse, apply=apply, measure=return_result,
        )
    return result if return_result else model
