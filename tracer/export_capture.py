"""Capture a model with ``torch.export`` (non-strict) into the networkx graph that
:func:`graphprune.tracer.build_graph` makes from torch.fx, for models torch.fx cannot trace
(Python control flow on shapes, iterated sizes, code torch.fx no longer supports).

The graph's ops are aten operators (``aten.conv2d.default``, ``aten.view.default`` …); each is
written as the torch call it stands for (:mod:`graphprune.tracer.aten_ops`), so the rule
table serves both front-ends, and the checks torch.export inserts are left out. Shapes come from the program's fake
tensors (``node.meta["val"]``), so the model is never run on its values; each node's
module is the innermost module of its ``nn_module_stack``. A placeholder that the graph
signature maps to a parameter or buffer becomes a ``get_attr`` node of the user's own
tensor, placed before its first user as torch.fx places it; a lifted constant becomes a
``get_attr`` node without a tensor (a constant created by the tracer); user inputs stay
placeholders. Every module is captured down to aten ops, but the leaves that
:mod:`graphprune.tracer.export_calls` keeps whole (one ``call_module`` node, as under torch.fx);
the scopes of ``torch.no_grad()`` and autocast blocks are inlined. The capture runs without grad.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

import networkx as nx
import torch
import torch._functorch.config
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._pytree import tree_map_only

from .aten_ops import is_check, torch_call
from .export_calls import flat_graph, kept_whole
from .export_sizes import DataDependentSize, ValueReader
from .fx_capture import DEFAULT_LEAVES, LeafSpec, TraceError
from .graph import _resolve_attr, _scope, _target_name, call_args, input_error
from .record import describe
from .state import interrupts_deferred


@contextmanager
def _quiet() -> Iterator[None]:
    """Hold back what torch.export prints or logs (up to ERROR) while it runs: where it fails
    it prints the graphs it had, and graphprune reports the failure itself (or falls back)."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def export_program(model: nn.Module, example_inputs: Any, whole: tuple = (), on_values: bool = True,
                   check_inputs: bool = True) -> tuple:
    """``(torch.export.export(model, …, strict=False), names of output types left out, whether
    a branch was decided on the values)``, with
    the call signatures of the modules named in ``whole`` recorded; InputError if the model
    itself rejects the inputs (asked, by a run, only with ``check_inputs``: a caller with
    another front-end to try asks once all failed), else TraceError for any failure (what the export left on the
    model stays until the caller restores it, as :func:`graphprune.tracer.trace` does).
    Exported without grad, so that a ``torch.no_grad()`` block adds no scope. With
    ``on_values``, a branch on the values (a data-dependent guard) in torch.nn's own code is
    decided on the example's values (:func:`_real_values`, :func:`_in_torch_layers`); any other
    branch on the values, and any without ``on_values``, fails the capture.

    An output object of a type torch.export cannot flatten (a Hugging Face model's KV cache,
    ``DynamicCache``) is left out of the outputs: its tensors are state the model makes for
    itself, whose sizes follow the pruning, not a result of fixed shape."""
    args, kwargs = call_args(example_inputs)
    left_out: list = []
    decide, on_values = on_values, False
    while True:
        try:
            with interrupts_deferred(), _quiet(), _leafless(left_out), _left_out_when_returned(model, left_out), \
                    torch.no_grad(), _real_values(on_values):
                # export patches modules and global state
                program = torch.export.export(model, args, kwargs, strict=False, preserve_module_call_signature=whole)
            return program, [_type_name(t) for t in left_out], on_values
        except Exception as exc:
            unknown = _unknown_output_type(exc)
            if unknown is not None and unknown not in left_out:
                left_out.append(unknown)
                continue
            if decide and not on_values and _data_dependent(exc) and hasattr(torch._functorch.config, _REAL_VALUES) \
                    and _in_torch_layers(exc):
                on_values = True  # decide such branches on the example's values, as a run would
                continue
            rejected = input_error(model, example_inputs) if check_inputs else None
            if rejected is not None:
                raise rejected from exc
            first = (str(exc).strip().splitlines() or [""])[0]
            raise TraceError(
                f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {first}",
                location=f"torch.export, {type(exc).__name__}",
            ) from exc


_REAL_VALUES = "fake_tensor_propagate_real_tensors"


def _real_values(on: bool):
    """With ``on``, torch.export computes the example's real values beside its fake ones and
    decides a branch on the values by them (what ``torch.export.draft_export`` does, without
    its logging): the graph holds for these inputs, as a torch.fx trace of one run does."""
    return torch._functorch.config.patch(**{_REAL_VALUES: True}) if on else contextlib.nullcontext()


_TORCH = os.path.dirname(torch.__file__) + os.sep
_TORCH_NN = os.path.join(_TORCH, "nn") + os.sep


def _in_torch_layers(exc: Exception) -> bool:
    """Whether the branch on values that stopped torch.export lies in torch.nn's own code (the
    innermost frame that is no tracing machinery): there such a branch picks between paths that
    compute the same (``nn.Transformer``'s check that a mask is causal, a fused fast path). A
    branch in the user's code may do anything on the other path: it is never decided."""
    frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_TORCH) or f.filename.startswith(_TORCH_NN)]
    return bool(frames) and frames[-1].startswith(_TORCH_NN) and not frames[-1].endswith(os.sep + "module.py")


def _data_dependent(exc: Exception) -> bool:
    """Whether torch.export failed on a branch that depends on the values (``if mask.all():``)."""
    return type(exc).__name__ in ("GuardOnDataDependentSymNode", "UserError") and "data-dependent" in str(exc)


_UNKNOWN_OUTPUT = re.compile(r"Found <class '([\w.]+)'> in output, which is not a known type")


def _unknown_output_type(exc: Exception) -> Optional[type]:
    """The class torch.export named as an output type it cannot flatten, if that was the failure."""
    found = _UNKNOWN_OUTPUT.search(str(exc))
    if found is None:
        return None
    module, _, name = found.group(1).rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) else None


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@contextmanager
def _leafless(types: list) -> Iterator[None]:
    """While it runs, each class of ``types`` (and each added to it meanwhile) flattens to no
    tensors (and is left out of the outputs); their registration is taken back afterwards."""
    for cls in types:
        _register_leafless(cls)
    try:
        yield
    finally:
        for cls in types:
            pytree._deregister_pytree_node(cls)


def _register_leafless(cls: type) -> None:
    pytree.register_pytree_node(cls, lambda obj: ([], None), lambda children, context: None,
                                serialized_type_name=_type_name(cls))


#: What torch.export can return (its own list is internal: aot_autograd's ``KNOWN_TYPES``).
_RETURNABLE = (torch.Tensor, int, float, bool, str, type(None), torch.SymInt, torch.SymFloat, torch.SymBool,
               torch.ScriptObject)


@contextmanager
def _left_out_when_returned(model: nn.Module, types: list) -> Iterator[None]:
    """While it runs, an object of a type torch.export cannot return (see :data:`_RETURNABLE`)
    in ``model``'s outputs is made to flatten to nothing as the forward returns it, and its type
    added to ``types`` (inside :func:`_leafless`, which takes the registration back): the one
    capture goes through instead of failing on it at the end."""
    def leave_out(module: nn.Module, args: Any, output: Any) -> None:
        for leaf in pytree.tree_leaves(output):
            if not isinstance(leaf, _RETURNABLE) and type(leaf) not in types:
                _register_leafless(type(leaf))
                types.append(type(leaf))

    handle = model.register_forward_hook(leave_out)
    try:
        yield
    finally:
        handle.remove()


def _rebuilt(program: "torch.export.ExportedProgram", whole: tuple) -> tuple:
    """The program's flat graph (:func:`flat_graph`: the calls of the modules ``whole`` kept
    whole) with every parameter, buffer and constant placeholder replaced by a ``get_attr``
    node (target: its state-dict name) placed before its first user, every aten op written as
    its torch call, and no inserted checks; and the names of the nodes that read a constant."""
    signature = program.graph_signature
    constants = dict(signature.inputs_to_lifted_tensor_constants)
    attributes = {**signature.inputs_to_parameters, **signature.inputs_to_buffers, **constants}
    graph: fx.Graph = fx.Graph()
    env: dict = {}

    def read(node: fx.Node) -> fx.Node:
        if node not in env:
            env[node] = graph.create_node("get_attr", attributes[node.name], name=node.name)
            env[node].meta = dict(node.meta)
        return env[node]

    for node in flat_graph(program, whole).nodes:
        if node.name in attributes or node.op == "call_function" and is_check(node.target) and not node.users:
            continue
        call = _torch_call(node)
        if call is None:
            env[node] = graph.node_copy(node, read)
        else:
            op, target, args, kwargs = call
            env[node] = graph.create_node(op, target, fx.node.map_arg(args, read), fx.node.map_arg(kwargs, read),
                                          name=node.name)
            env[node].meta = dict(node.meta)
    return graph, set(constants)


def _torch_call(node: fx.Node):
    """The torch call an aten node stands for (see :func:`torch_call`), or None."""
    if node.op != "call_function":
        return None
    first = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) else None
    return torch_call(node.target, node.args, node.kwargs, first.dim() if isinstance(first, torch.Tensor) else None)


def _size(value: Any) -> int:
    if isinstance(value, int):  # a static dim beside a symbolic one: (2, u0)
        return value
    hint = value.node.hint
    if hint is None:
        raise DataDependentSize()
    return int(hint)


def _concrete(tensor: torch.Tensor) -> torch.Tensor:
    if all(isinstance(d, int) for d in tensor.shape):
        return tensor
    return torch.empty([_size(d) for d in tensor.shape], dtype=tensor.dtype, device="meta")


def _value(node: fx.Node) -> Any:
    """The node's output described as :func:`describe` does, from its fake value (symbolic
    sizes replaced by the example's)."""
    value = node.meta.get("val")
    if node.op == "output":
        value = fx.node.map_arg(node.args[0], lambda n: n.meta.get("val"))
    return describe(tree_map_only(torch.SymInt, _size, tree_map_only(torch.Tensor, _concrete, value)))


def _name_of(node: fx.Node) -> str:
    return str(node.target) if isinstance(node.target, torch._ops.OpOverload) else _target_name(node)


def export_graph(model: nn.Module, example_inputs: Any, leaf_modules: Iterable[LeafSpec] = DEFAULT_LEAVES,
                 on_values: bool = True, check_inputs: bool = True) -> nx.DiGraph:
    """Capture ``model`` with torch.export and return the annotated networkx graph (the same
    node attributes as :func:`graphprune.tracer.build_graph`; ``front_end`` is ``"export"``).
    Of ``leaf_modules``, those :func:`kept_whole` names are one node each; ``on_values`` and
    ``check_inputs``: see :func:`export_program`."""
    whole = kept_whole(model, leaf_modules)
    program, left_out, decided_on_values = export_program(model, example_inputs, whole, on_values, check_inputs)
    try:
        values = ValueReader(program, example_inputs, _value)
        graph = _annotated(model, program, left_out, whole, values)
        # torch.export propagates fake tensors: the shapes came without the model's values, unless
        # a branch or a size was decided on them
        graph.graph["recorded_on_meta"] = not (decided_on_values or values.read_values)
        return graph
    except TraceError:
        raise
    except Exception as exc:  # a graph this module cannot read: the capture failed, not the analysis
        raise TraceError(f"the torch.export graph of {type(model).__name__} could not be read: {type(exc).__name__}: {exc}",
                         location=f"torch.export graph, {type(exc).__name__}") from exc


def _annotated(model: nn.Module, program: "torch.export.ExportedProgram", left_out: list, whole: tuple,
               value_of: Callable[[fx.Node], Any]) -> nx.DiGraph:
    fx_graph, constants = _rebuilt(program, whole)
    graph = nx.DiGraph(model=model, opaque={}, front_end="export", left_out=left_out)
    modules = dict(model.named_modules(remove_duplicate=False))
    for index, node in enumerate(fx_graph.nodes):
        attrs = dict(index=index, part="", op=node.op, target=node.target, target_name=_name_of(node),
                     module=_scope(node, modules), value=value_of(node), fx=node, front_end="export")
        if node.op == "get_attr":
            attrs["tensor"] = None if node.name in constants else _resolve_attr(model, node.target)
        elif node.op == "call_module":
            attrs["module_type"] = type(model.get_submodule(node.target)).__name__
        graph.add_node(node.name, **attrs)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph
