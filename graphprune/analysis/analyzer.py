"""One analysis of one model: trace it, propagate channel identity, and cut the channel space
into coupled groups (the report). Pruning it is :class:`graphprune.session.PruningSession`'s."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Union

import numpy as np
from torch import nn

from graphprune import tracer
from graphprune.analysis.report import Report
from graphprune.tracer.devices import describe_value, tensors_in
from graphprune.tracer.fallback import check_capture
from graphprune.tracer.fx_capture import check_leaf_names
from graphprune.validation import check_bool, check_model

from .channels import per_array
from .groups import Group, build_groups
from .inputs import resolve_example_inputs
from .propagate import propagate
from .propagation import Propagation
from .reasons import BlockKind, Reason
from .rules import has_module_rule
from .unreached import block_unreached

LayerRef = Union[str, nn.Module]


@dataclass(frozen=True)
class AnalysisOptions:
    """:func:`graphprune.analyze`'s options, checked once against the model
    (:meth:`checked`): ``leaf_modules`` (names, classes, modules or predicates),
    ``ignored_layers`` (module names), ``prune_heads`` and ``capture``. ``NAMES`` are the
    keyword arguments they come from, which :func:`graphprune.prune` and the workflows share."""

    leaf_modules: tuple = ()
    ignored_layers: frozenset = frozenset()
    prune_heads: bool = False
    capture: str = "auto"

    NAMES = ("leaf_modules", "ignored_layers", "prune_heads", "capture")

    @classmethod
    def checked(cls, model: nn.Module, leaf_modules: Iterable = (), ignored_layers: Iterable = (),
                prune_heads: bool = False, capture: str = "auto") -> "AnalysisOptions":
        """The options for ``model``; TypeError / ValueError with a precise message otherwise."""
        check_bool(prune_heads, "prune_heads")
        check_capture(capture)
        check_leaf_names(model, leaf_modules)
        ignored = _layer_names(model, ignored_layers, "ignored_layers")
        return cls(tuple(leaf_modules), frozenset(ignored), prune_heads, capture)

    def as_kwargs(self) -> dict:
        """``{name: value}``, as :func:`graphprune.analyze` takes them."""
        return {"leaf_modules": list(self.leaf_modules), "ignored_layers": sorted(self.ignored_layers),
                "prune_heads": self.prune_heads, "capture": self.capture}


def _layer_names(model: nn.Module, layers: Iterable[LayerRef], argument: str) -> set[str]:
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if not isinstance(layers, Iterable):
        raise TypeError(f"{argument} must be module names or modules (a list of them), got {type(layers).__name__}")
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
            group.blocked.append(Reason(BlockKind.IGNORED, "ignored_layers: " + ", ".join(hits)))


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
        if isinstance(labels, dict):
            return {k: dims(v) for k, v in labels.items()}
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
    """What one analysis found (``state``, ``roots``, ``groups``, ``report``) and what it was
    made from (``model``, the resolved ``inputs`` and the options)."""

    def __init__(self, model: nn.Module, example_inputs: Any, description: str, options: AnalysisOptions):
        graph = tracer.trace(model, example_inputs, traced_leaves(options.leaf_modules), options.capture)
        self.state = propagate(graph, options.prune_heads)
        block_unreached(self.state, example_inputs)
        self.roots = self.state.space.all_roots()
        self.groups = build_groups(self.state, self.roots)
        _ignore(self.groups, options.ignored_layers)
        _annotate_channels(self.state, self.roots, self.groups)
        self.model = model
        self.inputs = example_inputs  # as resolved: inferred when the caller gave none
        self.options = options
        # the front-end that captured the model (of those options.capture allows), which the audit captures the pruned model with
        self.front_end = graph.graph["front_end"] if graph.graph["front_end"] in ("fx", "export") else options.capture
        self.fingerprint = fingerprint(model)
        self.report = Report(type(model).__name__, self.groups, graph, description)


def fingerprint(model: nn.Module) -> tuple:
    """Identity and shape of every module, parameter and buffer: changes when the model is
    pruned or its layers are replaced, not when weights are updated in place."""
    modules, tensors = [], []
    for name, module in model.named_modules(remove_duplicate=False):
        modules.append((name, id(module)))
        for registry in (module._parameters, module._buffers):
            tensors.extend((name, key, id(t), t.shape, t.dtype, t.device) for key, t in registry.items() if t is not None)
    return tuple(modules), tuple(tensors)


def run_analysis(model: nn.Module, example_inputs: Any, options: AnalysisOptions) -> Analysis:
    """Resolve the inputs and analyse ``model`` with the checked ``options``; the resolved inputs are ``.inputs``."""
    check_model(model)
    inputs, inferred = resolve_example_inputs(model, example_inputs)
    _check_devices(model, inputs)
    description = "inferred " + describe_inputs(inputs) if inferred else describe_inputs(inputs)
    try:
        return Analysis(model, inputs, description, options)
    except tracer.InputError as exc:
        if inferred:
            raise ValueError(f"{exc} The inferred input was {describe_inputs(inputs)}; pass example_inputs.") from exc
        raise ValueError(str(exc)) from exc
    except tracer.TraceError:
        raise
    except Exception as exc:  # a failure of graphprune itself: one documented error, with its cause
        raise AnalysisError(f"graphprune could not analyse {type(model).__name__}: {type(exc).__name__}: {exc} "
                            "(an internal error; please report it with the model)") from exc


class AnalysisError(RuntimeError):
    """The analysis itself failed (not the capture, not the inputs): a graphprune bug. The
    model is unchanged; the cause is chained."""


def _check_devices(model: nn.Module, inputs: Any) -> None:
    """Inputs must live on the model's device. A model on the meta device is analysed by its
    shapes alone, but not one partly there: its forward would mix devices."""
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    if len(devices) > 1 and any(d.type == "meta" for d in devices):
        raise ValueError(f"{type(model).__name__} has some tensors on the meta device and others on "
                         f"{', '.join(sorted(str(d) for d in devices if d.type != 'meta'))}; analyse it all on meta "
                         "(build it under torch.device('meta')) or materialise it first")
    input_devices = {t.device for t in tensors_in(inputs)}
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
