"""The torch.export graph as graphprune reads it: one flat graph, with some module calls whole.

* A scope that a higher-order op wraps (``wrap_with_set_grad_enabled`` for a ``torch.no_grad()``
  or ``torch.enable_grad()`` block, ``wrap_with_autocast`` for an autocast one) is inlined: its
  ops run as any other, only the grad or autocast mode differs, which no rule reads.
* A call of a module kept whole (:data:`KEPT_WHOLE`, where it is a leaf: a rule reads it) is
  one ``call_module`` node, as under torch.fx, instead of its aten ops. torch.export records the
  call's inputs and outputs where it is asked to keep the module's call signature
  (``preserve_module_call_signature``); the call replaces the ops its outputs depend on and its
  inputs do not, where every one of them was issued by the module and none is read elsewhere.
  A call inside a scope has no recorded signature: its aten ops stay (and block where no rule
  follows them). The capture runs without grad, so a ``torch.no_grad()`` block makes no scope.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable, NamedTuple, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.export import graph_signature as signature_types

from .fx_capture import LeafSpec, LeafTest, forward_hooks

#: torch.nn modules kept as one node under torch.export where they are leaves: their aten form
#: is one that no rule can follow. MultiheadAttention folds its heads into the batch dim
#: (``view(L, N * heads, head_dim)``); its module rule reads the call whole.
KEPT_WHOLE = (nn.MultiheadAttention,)

_SCOPES = tuple(getattr(torch.ops.higher_order, name) for name in ("wrap_with_set_grad_enabled", "wrap_with_autocast")
                if hasattr(torch.ops.higher_order, name))
_TRACEPOINT = getattr(torch.ops.higher_order, "_export_tracepoint", None)


def kept_whole(model: nn.Module, leaf_modules: Iterable[LeafSpec]) -> tuple:
    """Names of the modules of :data:`KEPT_WHOLE` that are leaves (and have no hooks, which
    torch.export captures with the module's ops)."""
    is_leaf = LeafTest(leaf_modules)
    return tuple(name for name, m in model.named_modules()
                 if name and isinstance(m, KEPT_WHOLE) and not forward_hooks(m) and is_leaf(m, name))


class _Call(NamedTuple):
    module: str
    inputs: Any  # (args, kwargs) of old nodes and constants
    outputs: list  # old nodes and constants, in the order of out_spec
    out_spec: pytree.TreeSpec
    keys: list  # where each output lies in the call's result: the keys of getitems
    region: set  # the old nodes the call replaces
    last: fx.Node  # the call is placed where the last of them was


def _argument(spec: Any, nodes: dict) -> Any:
    if isinstance(spec, signature_types.ConstantArgument):
        return spec.value
    node = nodes.get(getattr(spec, "name", None))
    if node is None:
        raise LookupError(spec)
    return node


def _ancestors(nodes: Iterable[fx.Node]) -> set:
    """``nodes`` and every node they depend on."""
    seen, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _issued_by(node: fx.Node, module: str) -> bool:
    return any(path[0] == module for path in (node.meta.get("nn_module_stack") or {}).values())


def _call(entry: Any, nodes: dict, order: dict) -> Optional[_Call]:
    """The whole call that a module-call-graph ``entry`` records, or None where it cannot replace
    its ops (its signature is missing, or an op of it is read outside it or issued elsewhere)."""
    module, sig = entry.fqn.split("@")[0], entry.signature
    if sig is None or not sig.outputs:
        return None
    try:
        inputs, outputs = [_argument(a, nodes) for a in sig.inputs], [_argument(a, nodes) for a in sig.outputs]
    except LookupError:
        return None
    keys = _output_keys(sig.out_spec)
    before = _ancestors(i for i in inputs if isinstance(i, fx.Node))
    region = {n for n in _ancestors(o for o in outputs if isinstance(o, fx.Node)) - before if n.op != "placeholder"}
    todo = list(region - set(outputs))
    while todo:  # the module's ops that read its own values but make no output (checks, sizes)
        for user in todo.pop().users:
            if user not in region and user.op != "output" and _issued_by(user, module):
                region.add(user)
                todo.append(user)
    inner = region - set(outputs)
    if keys is None or not region or not all(_issued_by(n, module) for n in region) \
            or any(u not in region for n in inner for u in n.users):
        return None
    return _Call(module, pytree.tree_unflatten(inputs, sig.in_spec), outputs, sig.out_spec, keys, region,
                 max(region, key=order.get))


def _output_keys(out_spec: pytree.TreeSpec) -> Optional[list]:
    """For each output leaf, the keys that pick it out of the call's result (tuples, lists and
    dicts), or None for a result of another kind."""
    paths = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec))[0]
    keys = [[getattr(k, "idx", getattr(k, "key", None)) for k in path] for path, _ in paths]
    kinds = (pytree.SequenceKey, pytree.MappingKey)
    return keys if all(isinstance(k, kinds) for path, _ in paths for k in path) else None


def _calls(program: Any, modules: tuple) -> dict:
    """``{last node: _Call}`` for each recorded call of ``modules`` that can be kept whole."""
    nodes = {n.name: n for n in program.graph.nodes}
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    calls = (_call(e, nodes, order) for e in program.module_call_graph if e.fqn.split("@")[0] in modules)
    return {c.last: c for c in calls if c is not None}


def _stack_until(node: fx.Node, module: str, inclusive: bool) -> dict:
    """``node``'s module stack down to ``module`` (with it, or only its callers)."""
    stack: dict = {}
    for key, path in (node.meta.get("nn_module_stack") or {}).items():
        if path[0] == module and not inclusive:
            break
        stack[key] = path
        if path[0] == module:
            break
    return stack


def _emit(graph: fx.Graph, call: _Call, env: dict) -> None:
    """Add ``call`` as a ``call_module`` node (and a getitem for each of its outputs)."""
    look = lambda v: env[v] if isinstance(v, fx.Node) else v  # noqa: E731
    args, kwargs = pytree.tree_map(look, call.inputs, is_leaf=lambda v: isinstance(v, fx.Node))
    node = graph.create_node("call_module", call.module, tuple(args), dict(kwargs), name=call.module.replace(".", "_"))
    vals = [o.meta.get("val") if isinstance(o, fx.Node) else o for o in call.outputs]
    node.meta = {"val": pytree.tree_unflatten(vals, call.out_spec),
                 "nn_module_stack": _stack_until(call.last, call.module, inclusive=True)}
    caller = _stack_until(call.last, call.module, inclusive=False)
    for keys, output in zip(call.keys, call.outputs):
        if not isinstance(output, fx.Node):
            continue
        item = node
        for key in keys:
            item = graph.create_node("call_function", operator.getitem, (item, key))
            item.meta = {"nn_module_stack": caller}
        item.meta["val"] = output.meta.get("val")
        env[output] = item


def flat_graph(program: Any, modules: tuple = ()) -> fx.Graph:
    """``program``'s graph with its scopes inlined and the calls of ``modules`` (recorded with
    their signatures) kept whole; the placeholders keep their names."""
    graph, env = fx.Graph(), {}
    calls = _calls(program, modules)
    replaced = set().union(*(c.region for c in calls.values()))
    for node in program.graph.nodes:
        if node in replaced:
            if node in calls:
                _emit(graph, calls[node], env)
            continue
        _copy(graph, node, env, program.graph_module)
    return graph


def _copy(graph: fx.Graph, node: fx.Node, env: dict, owner: nn.Module) -> None:
    """Copy ``node`` into ``graph``: a scope's ops in its place (``env[node]`` is the tuple of its
    outputs), a getitem of such a tuple as the item itself, a submodule read only by scopes not at all."""
    if node.op == "get_attr" and isinstance(getattr(owner, node.target, None), fx.GraphModule):
        return
    if node.op == "call_function" and node.target in _SCOPES:
        env[node] = _inline(graph, node, env, owner)
    elif node.op == "call_function" and _TRACEPOINT is not None and node.target is _TRACEPOINT:
        env[node] = tuple(fx.node.map_arg(node.args, env.__getitem__))
    elif node.op == "call_function" and node.target is operator.getitem and isinstance(env.get(node.args[0]), tuple):
        env[node] = env[node.args[0]][node.args[1]]
    else:
        env[node] = graph.node_copy(node, env.__getitem__)


def _inline(graph: fx.Graph, node: fx.Node, env: dict, owner: nn.Module) -> tuple:
    """The ops of the scope ``node`` wraps, copied into ``graph``; returns its outputs."""
    position = next(i for i, a in enumerate(node.args)
                    if isinstance(a, fx.Node) and isinstance(getattr(owner, a.target, None), fx.GraphModule))
    body: fx.GraphModule = getattr(owner, node.args[position].target)
    operands = iter(fx.node.map_arg(node.args[position + 1:], env.__getitem__))
    inner: dict = {}
    for sub in body.graph.nodes:
        if sub.op == "placeholder":
            inner[sub] = next(operands)
        elif sub.op == "output":
            return tuple(fx.node.map_arg(sub.args[0], inner.__getitem__))
        else:
            _copy(graph, sub, inner, body)
    raise ValueError(f"{node.name}: the scope's graph has no output")
