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

import copy
from typing import Any, Mapping, NamedTuple, NoReturn, Optional

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map_only

from .capture import TraceError


class TensorSpec(NamedTuple):
    """Shape and dtype of one tensor seen while running the graph."""

    shape: tuple
    dtype: torch.dtype


class InputError(ValueError):
    """The model rejected the example inputs."""


def describe(value: Any) -> Any:
    """Replace tensors by TensorSpecs, recursively through tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(describe(v) for v in value)
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    return value


class _Recorder(fx.Interpreter):
    """Interpreter that stores a shape description of every node's output."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}
        self.failed: Optional[fx.Node] = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception:
            self.failed = self.failed or n
            raise
        self.values[n.name] = describe(result)
        return result


def positional_inputs(gm: fx.GraphModule, example_inputs: Any) -> tuple:
    """Order ``example_inputs`` as the graph's placeholders: a tuple holds positional inputs,
    a dict keyword inputs, anything else (a tensor, a list of images) is the one input."""
    if isinstance(example_inputs, Mapping):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
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
        return example_inputs
    return (example_inputs,)


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` with ``example_inputs`` in the tensor / tuple / kwargs-dict convention."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


def _scope(node: fx.Node) -> Optional[str]:
    """Qualified name of the innermost module whose forward issued ``node``."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack)) if stack else None


def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__", repr(node.target))


def _record_on_meta_tensors(gm: fx.GraphModule, args: tuple) -> Optional[_Recorder]:
    """Run a meta-device copy of ``gm`` (shapes and dtypes only, no arithmetic); None if it cannot.

    The copy shares no storage with the model: every parameter and buffer is replaced by an
    empty meta tensor of the same shape, so copying costs nothing. Code that needs actual
    values (``.item()``, data-dependent shapes such as ``nonzero``, numpy, tensors it creates
    on the CPU) raises on meta tensors; the caller then runs ``gm`` on the real inputs.
    """
    memo: dict = {}
    for tensor in [*gm.parameters(), *gm.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    recorder = _Recorder(copy.deepcopy(gm, memo))
    try:
        with torch.no_grad():
            recorder.run(*tree_map_only(torch.Tensor, lambda t: t.to("meta"), args))
    except Exception:
        return None
    return recorder


def _explain_failure(model: nn.Module, example_inputs: Any, node: Optional[fx.Node], exc: Exception) -> NoReturn:
    """Raise InputError if ``model`` itself rejects the inputs, else TraceError naming ``node``."""
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    except Exception as model_exc:
        raise InputError(
            f"{type(model).__name__} raised {type(model_exc).__name__} on the example inputs: {model_exc}. "
            "Pass example_inputs that the model accepts."
        ) from model_exc
    module = (node.target if node.op == "call_module" else _scope(node)) if node is not None else None
    where = f"node '{node.name}'" if node is not None else "unknown node"
    raise TraceError(
        f"the traced graph of {type(model).__name__} fails at {where} where the model itself runs "
        f"({type(exc).__name__}: {exc}); mark the submodule involved with leaf_modules=[...]",
        module_name=module or None,
        location=where,
    ) from exc


def build_graph(model: nn.Module, gm: fx.GraphModule, example_inputs: Any) -> nx.DiGraph:
    """Run ``gm`` on ``example_inputs`` (no grad) and return the annotated networkx graph.

    Node keys are fx node names; every node has ``part == ""`` (see :mod:`tracer.fallback`).
    """
    args = positional_inputs(gm, example_inputs)
    recorder = _record_on_meta_tensors(gm, args)
    if recorder is None:
        recorder = _Recorder(gm)
        try:
            with torch.no_grad():
                recorder.run(*args)
        except Exception as exc:
            _explain_failure(model, example_inputs, recorder.failed, exc)

    graph = nx.DiGraph(model=model, graph_module=gm, opaque={})
    for index, node in enumerate(gm.graph.nodes):
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
            attrs["module_type"] = type(gm.get_submodule(node.target)).__name__
        elif node.op == "get_attr":
            attrs["tensor"] = _resolve_attr(model, node.target)
        graph.add_node(node.name, **attrs)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def _resolve_attr(model: nn.Module, target: str) -> Optional[torch.Tensor]:
    """The user's own tensor behind a ``get_attr`` target, or None if fx made it up."""
    obj: Any = model
    for part in target.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None
