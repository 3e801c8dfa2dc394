"""Fallback tracing for models that torch.fx cannot capture whole.

1. A submodule whose forward cannot be traced becomes an opaque leaf, with every module of
   its class, and tracing is retried.
2. If the root's own forward cannot be traced (data-dependent control flow, as in detection
   models), the model is run once to record what each child receives, and each child is
   traced on its own inputs (recursively). The children's graphs are merged into one graph
   whose node keys are prefixed with ``"<child name>/"``; that prefix is each node's ``part``.
   Whatever flows into or out of a traced part crosses untraced code, so it is blocked.

``capture`` chooses the front-end: ``"fx"`` (the above), ``"export"`` (torch.export only,
:mod:`graphprune.tracer.export_capture`) or ``"auto"``: torch.fx where it captures the whole
model; where it had to leave modules opaque (step 1) or could not trace the root's forward,
torch.export, and if that fails too, what torch.fx found (step 1, or the per-child tracing of
step 2). Where torch.fx took the root, torch.export decides a branch on the values in
torch.nn's own code (``nn.Transformer``'s check of a causal mask) on the example's values; a
branch on the values in the model's own code is never decided (the module stays opaque).
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable, Optional

import networkx as nx
import torch
from torch import nn

from .export_capture import export_graph
from .fx_capture import DEFAULT_LEAVES, LeafSpec, TraceError, capture, check_leaf_names
from .graph import build_graph, call_model, input_error, rejection
from .state import attributes_kept

_MAX_OPAQUE = 64
CAPTURES = ("fx", "export", "auto")


def check_capture(capture: Any) -> None:
    """Raise ValueError unless ``capture`` names a front-end (:data:`CAPTURES`)."""
    if not isinstance(capture, str) or capture not in CAPTURES:
        raise ValueError(f"capture must be 'fx', 'export' or 'auto', got {capture!r}")


def _trace_with_opaque_leaves(model: nn.Module, example_inputs: Any, leaf_modules: list,
                              check_inputs: bool = True) -> nx.DiGraph:
    """Trace and run, turning each failing submodule into a leaf (listed in ``graph.graph["opaque"]``);
    ``check_inputs`` goes to :func:`build_graph`."""
    opaque: dict[str, str] = {}
    while True:
        try:
            graph = build_graph(model, capture(model, leaf_modules + list(opaque)), example_inputs, check_inputs)
            graph.graph.update(opaque=opaque, front_end="fx")
            return graph
        except TraceError as exc:
            if exc.module_name is None or exc.module_name in opaque or len(opaque) >= _MAX_OPAQUE:
                raise
            # Modules of the failing class usually fail alike: make them all opaque at once.
            failing = type(model.get_submodule(exc.module_name))
            for name, module in model.named_modules():
                if type(module) is failing and not any(name.startswith(o + ".") for o in opaque):
                    opaque[name] = f"could not be traced ({exc.location}: {_cause(exc)})"


def _child_inputs(model: nn.Module, example_inputs: Any, within: Iterable[str] = ()) -> dict[str, list]:
    """The (args, kwargs) every direct child, and every module named in ``within``, was called
    with during one forward pass, by qualified name; an InputError if the model does not run on
    ``example_inputs``."""
    calls: dict[str, list] = {}
    handles = []
    for name in [*dict(model.named_children()), *within]:
        def record(module, args, kwargs, name=name):
            calls.setdefault(name, []).append((args, kwargs))
        handles.append(model.get_submodule(name).register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    except Exception as exc:  # the one run of the whole model: the inputs are at fault
        raise rejection(model, example_inputs, exc) from exc
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _grandchildren_needed(model: nn.Module, leaf_modules: list, prefix: str = "") -> list:
    """The qualified names of the modules below the children of ``model`` whose inputs tracing
    the children will need: the children of every child whose own forward torch.fx cannot
    trace (found without running anything), and so on down. Recorded in the one run of the
    model, they spare each such child a run of its own."""
    found = []
    for name, child in model.named_children():
        below = list(dict(child.named_children()))
        if name in leaf_modules or not below:
            continue
        leaves = _leaves_below(leaf_modules, name)
        try:
            capture(child, leaves)
        except TraceError as exc:
            if exc.module_name is None:  # its own forward: its children are traced apart
                found += [f"{prefix}{name}.{n}" for n in below]
                found += _grandchildren_needed(child, leaves, f"{prefix}{name}.")
        except Exception:  # noqa: BLE001 - its trace will tell; no run is spared
            continue
    return found


def _leaves_below(leaf_modules: list, name: str) -> list:
    """``leaf_modules`` as seen from the child ``name``: the names under it, relative, and every
    class, instance or predicate."""
    return [x for x in leaf_modules if not isinstance(x, str)] + \
        [n[len(name) + 1 :] for n in leaf_modules if isinstance(n, str) and n.startswith(name + ".")]


def _as_inputs(child: nn.Module, args: tuple, kwargs: dict) -> Any:
    if not kwargs:
        return args
    return dict(inspect.signature(child.forward).bind(*args, **kwargs).arguments)


def _merge(parts: list[tuple[str, nx.DiGraph]], model: nn.Module, opaque: dict) -> nx.DiGraph:
    front_ends = "+".join(sorted({graph.graph["front_end"] for _, graph in parts}))
    merged = nx.DiGraph(model=model, opaque=opaque, recorded_on_meta=False, front_end=front_ends)  # inputs from a real run
    offset = 0
    for prefix, graph in parts:
        owner = prefix[:-1]
        for key, attrs in graph.nodes(data=True):
            attrs = dict(attrs)
            attrs["index"] += offset
            attrs["part"] = prefix + attrs["part"]
            attrs["module"] = owner + "." + attrs["module"] if attrs["module"] else owner
            merged.add_node(prefix + key, **attrs)
        merged.add_edges_from((prefix + u, prefix + v) for u, v in graph.edges)
        offset += graph.number_of_nodes()
    return merged


def trace(model: nn.Module, example_inputs: Any, leaf_modules: Iterable[LeafSpec] = DEFAULT_LEAVES,
          capture: str = "auto") -> nx.DiGraph:
    """Capture ``model`` and return its annotated networkx graph: with torch.fx, falling back
    to opaque leaves, to torch.export and to per-child tracing where it fails (see the module
    docstring; ``capture`` chooses the front-end).

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs.
    ``leaf_modules`` lists module names, classes, instances or predicates torch.fx does not
    trace into (by default torch.nn's own, as torch.fx keeps them; graphprune's analysis names
    those its rules read, so that no module without a rule stays a leaf); torch.export captures
    every module (see :func:`graphprune.tracer.export_capture.export_graph` for those it keeps whole).
    The graph's ``opaque`` attribute maps every module treated as opaque to the reason;
    ``recorded_on_meta`` says whether its shapes were found without reading the model's values;
    ``front_end`` which front-end captured it (``"fx"``, ``"export"``, or both joined by ``+``
    for a graph merged from parts).
    Whatever tracing or running the forward leaves on the model's modules is taken back.
    """
    check_capture(capture)
    with attributes_kept(model):  # analysis never changes the model
        return _trace(model, example_inputs, list(leaf_modules), capture)


def _trace(model: nn.Module, example_inputs: Any, leaf_modules: list, capture: str,
           recorded: Optional[dict] = None) -> nx.DiGraph:
    if capture == "export":
        check_leaf_names(model, leaf_modules)
        return export_graph(model, example_inputs, leaf_modules)
    try:  # with a fallback, whether the inputs are at fault is asked only once every front-end failed
        graph, fx_error = _trace_with_opaque_leaves(model, example_inputs, leaf_modules, capture != "auto"), None
    except TraceError as exc:
        graph, fx_error = None, exc
    exported = capture == "auto" and (graph is None or graph.graph["opaque"])  # torch.fx could not capture all
    if exported:
        try:
            # where torch.fx could not take the root (a detector), a branch on the values fails the
            # capture, and the children are traced: deciding it on the values costs a capture of
            # every op of the whole model, in every audit
            return export_graph(model, example_inputs, leaf_modules, on_values=graph is not None, check_inputs=False)
        except TraceError:
            pass  # keep what torch.fx found, or trace the children, whose run checks the inputs
    if graph is not None:
        return graph
    if fx_error.module_name is not None or not dict(model.named_children()):
        if exported or not getattr(fx_error, "inputs_checked", True):
            rejected = input_error(model, example_inputs)
            if rejected is not None:
                raise rejected from rejected.__cause__
        raise fx_error
    return _trace_children(model, example_inputs, leaf_modules, fx_error, recorded)


def _trace_children(model: nn.Module, example_inputs: Any, leaf_modules: list, root_error: TraceError,
                    recorded: Optional[dict] = None) -> nx.DiGraph:
    """Trace each child of ``model`` apart, on the inputs it was called with: ``recorded`` (by
    qualified name, from the run of an ancestor) or one run of ``model``, which also records
    those :func:`_grandchildren_needed` names."""
    parts, opaque = [], {"": f"its forward could not be traced ({root_error.location}: {_cause(root_error)})"}
    if not recorded:
        recorded = _child_inputs(model, example_inputs, _grandchildren_needed(model, leaf_modules))
    for name, calls in [(k, v) for k, v in recorded.items() if "." not in k]:  # the children, in the order called
        child = model.get_submodule(name)
        if len(calls) > 1:
            opaque[name] = "called more than once by untraceable code"
            continue
        if name in leaf_modules:
            continue
        below = {k[len(name) + 1 :]: v for k, v in recorded.items() if k.startswith(name + ".")}
        try:
            # torch.fx only: torch.export, tried on the root already, fails slowly on children too
            graph = _trace(child, _as_inputs(child, *calls[0]), _leaves_below(leaf_modules, name), "fx", below)
        except Exception as exc:  # a child that cannot be captured stays opaque
            opaque[name] = f"could not be traced ({_cause(exc)})"
            continue
        opaque.update({f"{name}.{k}" if k else name: v for k, v in graph.graph["opaque"].items()})
        parts.append((name + "/", graph))
    if not parts:
        raise root_error
    return _merge(parts, model, opaque)


def _cause(exc: BaseException) -> str:
    """The exception behind a capture failure, in one short line: its type and first sentence."""
    cause = exc.__cause__ or exc
    text = " ".join(str(cause).split()).split(". ")[0]
    return f"{type(cause).__name__}: {text[:160]}"
