"""Propagate the example inputs' shapes through the captured graph and turn it into a networkx graph.

Shapes are propagated on meta tensors; a graph that needs real values runs on the real inputs.

Each graph node is one fx node and carries:

* ``op`` / ``target`` / ``target_name``: what the fx node does;
* ``module``: the qualified name of the called module (``call_module``) or of the innermost
  module whose forward issued the op; ``module_type`` for module calls;
* ``value``: the node's output with every tensor replaced by a :class:`TensorSpec`
  (a tuple of them for multi-output ops, plain values for ints and sizes);
* ``tensor``: for ``get_attr`` nodes, the user's own Parameter or buffer;
* ``fx``: the fx node itself.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Mapping, NoReturn, Optional

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from .fx_capture import TraceError
from .record import Recorder, fails_alike, record_on_meta


class InputError(ValueError):
    """The model rejected the example inputs; ``node_name`` is the traced node that failed
    first on them, if known."""

    def __init__(self, message: str, node_name: Optional[str] = None):
        super().__init__(message)
        self.node_name = node_name


def positional_inputs(graph: fx.Graph, example_inputs: Any) -> tuple:
    """Order ``example_inputs`` as the graph's placeholders: a tuple holds positional inputs,
    a dict keyword inputs, anything else (a tensor, a list of images) is the one input."""
    if isinstance(example_inputs, Mapping):
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        unknown = set(example_inputs) - {p.target.lstrip("*") for p in placeholders}
        if unknown:
            raise InputError(f"example_inputs has keys {sorted(unknown)} that forward() does not take")
        args = []
        for p in placeholders:
            name = p.target.lstrip("*")
            if name in example_inputs:
                args.append(example_inputs[name])
            elif p.args:
                args.append(p.args[0])
            else:
                raise InputError(f"example_inputs has no value for forward() argument '{name}'")
        return tuple(args)
    if isinstance(example_inputs, tuple):
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(example_inputs) > len(placeholders) and not any(p.target.startswith("*") for p in placeholders):
            raise InputError(
                f"example_inputs holds {len(example_inputs)} positional inputs but forward() takes "
                f"{len(placeholders)} ({', '.join(p.target for p in placeholders)}). A tuple's items are passed to "
                "forward() as positional inputs; to pass the tuple as ONE input, wrap it: (example_inputs,)"
            )
        return example_inputs
    return (example_inputs,)


def call_args(example_inputs: Any) -> tuple:
    """``(args, kwargs)`` of ``example_inputs`` in the tensor / tuple / kwargs-dict convention:
    a dict holds keyword inputs, a tuple positional inputs, anything else is the one input."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` with ``example_inputs`` (see :func:`call_args`)."""
    args, kwargs = call_args(example_inputs)
    return model(*args, **kwargs)


def _scope(node: fx.Node, modules: Optional[dict] = None) -> Optional[str]:
    """Qualified name of the innermost module whose forward issued ``node`` (the stack's keys
    carry a call count, ``cpe@1``, for a module called again; its values the plain path).
    With ``modules`` (the model's modules by name), the innermost one among them: torch.export
    names a module reached through a Sequential sliced in forward (``self.m[:-1]``) by that
    slice, which :func:`_unsliced` resolves, and one made in forward by how it was reached."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for key, path in reversed(stack.items()):
        name = path[0] if isinstance(path, tuple) else key.split("@")[0]
        if modules is None:
            return name
        name = _unsliced(name, modules)
        if name in modules:
            return name
    return ""


_SLICED = re.compile(r"^(.*?)\.slice\((-?\d+|None), (-?\d+|None), (-?\d+|None)\)\.(\d+)")


def _unsliced(name: str, modules: dict) -> str:
    """``a.m.slice(None, -1, None).2.conv`` as the submodule it is, ``a.m.2.conv``."""
    while True:
        match = _SLICED.match(name)
        container = modules.get(match.group(1)) if match else None
        if container is None or not hasattr(container, "__len__"):
            return name
        start, stop, step = (None if g == "None" else int(g) for g in match.group(2, 3, 4))
        positions = range(len(container))[start:stop:step]
        index = int(match.group(5))
        if index >= len(positions):
            return name
        name = f"{match.group(1)}.{positions[index]}{name[match.end():]}"


def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__", repr(node.target))


def _container_hint(model: nn.Module, example_inputs: Any) -> str:
    """A sentence on how ``example_inputs``' container reached forward(), when that may be
    what the model rejected: a list is one input; a tuple's items are positional inputs,
    which forward() cannot take although it takes the tuple as one input."""
    if isinstance(example_inputs, list):
        return (
            " A list is passed to forward() as ONE input (as detection models take a list of images); "
            "pass several positional inputs as a tuple: tuple(example_inputs)."
        )
    if not isinstance(example_inputs, tuple):
        return ""
    try:
        signature = inspect.signature(model.forward)
        signature.bind(example_inputs)
    except (TypeError, ValueError):
        return ""  # no signature, or the tuple as one input does not fit either
    try:
        signature.bind(*example_inputs)
    except TypeError:
        return (
            f" A tuple's {len(example_inputs)} items are passed to forward() as {len(example_inputs)} positional "
            "inputs; to pass the tuple as ONE input, wrap it: (example_inputs,)."
        )
    return ""


def input_error(model: nn.Module, example_inputs: Any, node: Optional[fx.Node] = None) -> Optional[InputError]:
    """The InputError to raise if ``model`` itself rejects ``example_inputs`` (run once, no
    grad), or None if it runs on them; ``node`` is the captured node that failed, if known."""
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    except Exception as model_exc:
        return rejection(model, example_inputs, model_exc, node)
    return None


def rejection(model: nn.Module, example_inputs: Any, model_exc: Exception, node: Optional[fx.Node] = None) -> InputError:
    """The InputError saying that ``model`` raised ``model_exc`` when run on ``example_inputs``."""
    on_meta = any(t.is_meta for t in model.parameters())
    advice = (" Its forward reads values, which a model on the meta device does not hold: analyse it materialised."
              if on_meta else " Pass example_inputs that the model accepts.")
    error = InputError(
        f"{type(model).__name__} raised {type(model_exc).__name__} on the example inputs: "
        f"{str(model_exc).rstrip('.')}.{advice}"
        + _container_hint(model, example_inputs),
        node_name=node.name if node is not None else None,
    )
    error.__cause__ = model_exc
    return error


def _explain_failure(model: nn.Module, example_inputs: Any, node: Optional[fx.Node], exc: Exception,
                     check_inputs: bool = True) -> NoReturn:
    """Raise InputError if ``model`` itself rejects the inputs, else TraceError naming ``node``.

    Telling the two apart runs the whole model. Without ``check_inputs``, a failure outside any
    submodule (which no opaque leaf can mend) skips that run and raises a TraceError with
    ``inputs_checked=False``: the caller tries another front-end first, whose success shows
    that the inputs were fine, and checks them only when every front-end failed."""
    module = (node.target if node.op == "call_module" else _scope(node)) if node is not None else None
    if check_inputs or module:
        rejected = input_error(model, example_inputs, node)
        if rejected is not None:
            raise rejected from rejected.__cause__
    where = f"node '{node.name}'" if node is not None else "unknown node"
    error = TraceError(
        f"the traced graph of {type(model).__name__} fails at {where} where the model itself runs "
        f"({type(exc).__name__}: {exc}); mark the submodule involved with leaf_modules=[...]",
        module_name=module or None,
        location=where,
        node_name=node.name if node is not None else None,
    )
    error.inputs_checked = check_inputs or bool(module)
    raise error from exc


def build_graph(model: nn.Module, fx_graph: fx.Graph, example_inputs: Any, check_inputs: bool = True) -> nx.DiGraph:
    """Run ``fx_graph`` (captured from ``model``) on ``example_inputs`` and return the annotated
    networkx graph: on meta tensors where it can, else once on the real inputs (no grad). Where
    that fails, see :func:`_explain_failure` (``check_inputs``).

    Node keys are fx node names; every node has ``part == ""`` (see :mod:`graphprune.tracer.fallback`).
    ``graph.graph["recorded_on_meta"]`` says whether the shapes came without the model's values.
    """
    args = positional_inputs(fx_graph, example_inputs)
    failures: list = []
    recorder = record_on_meta(model, fx_graph, args, failures)
    on_meta = recorder is not None
    if not on_meta and not check_inputs and fails_alike(*failures[0]):  # not worth a run of the whole model
        _explain_failure(model, example_inputs, failures[0][0], failures[0][1], check_inputs)
    if not on_meta:
        recorder = Recorder(model, fx_graph)
        try:
            with torch.no_grad():
                recorder.run(*args)
        except Exception as exc:
            _explain_failure(model, example_inputs, recorder.failed, exc, check_inputs)

    graph = nx.DiGraph(model=model, opaque={}, recorded_on_meta=on_meta)
    for index, node in enumerate(fx_graph.nodes):
        attrs = dict(
            index=index,
            part="",
            op=node.op,
            target=node.target,
            target_name=_target_name(node),
            module=node.target if node.op == "call_module" else _scope(node),
            value=recorder.values.get(node.name),
            fx=node,
        )
        if node.op == "call_module":
            attrs["module_type"] = type(recorder.module_at(node.target)).__name__
        elif node.op == "get_attr":
            attrs["tensor"] = _resolve_attr(model, node.target)
        graph.add_node(node.name, **attrs)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def _resolve_attr(model: nn.Module, target: str) -> Optional[torch.Tensor]:
    """The parameter or buffer behind a ``get_attr`` target, or None for a constant that
    torch.fx made up (and attached to the model for the time of the trace)."""
    *path, name = target.split(".")
    owner: Any = model
    for part in path:
        owner = owner._modules.get(part) if isinstance(owner, nn.Module) else None
        if owner is None:
            return None
    if not isinstance(owner, nn.Module):
        return None
    return owner._parameters.get(name, owner._buffers.get(name))
