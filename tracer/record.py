"""Run a captured graph node by node and record every node's output shape.

:func:`record_on_meta` runs on meta tensors: every parameter, buffer and input is replaced
by an empty meta tensor of the same shape, so nothing is copied or computed. Modules are
called through lightweight clones that hold those meta tensors; the user's modules are
never touched. Calls that :mod:`graphprune.tracer.shape_rules` knows are not run at all: their output
is a fresh tensor of the shape the rule gives (their meta kernels are Python decompositions
that cost more than the rest of the run). :class:`Recorder` runs on whatever tensors it is given.
"""
from __future__ import annotations

import copy
from typing import Any, NamedTuple, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map_only

from .fx_capture import forward_hooks
from .shape_rules import function_output, module_output


class TensorSpec(NamedTuple):
    """Shape and dtype of one tensor seen while running the graph."""

    shape: tuple
    dtype: torch.dtype


def describe(value: Any) -> Any:
    """Replace tensors by TensorSpecs, recursively through tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(describe(v) for v in value)
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    return value


class Recorder(fx.Interpreter):
    """Runs ``graph`` with ``model`` as the owner of its modules and stores a shape
    description (:func:`describe`) of every node's output in ``values``."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        super().__init__(model, graph=graph)
        self.values: dict[str, Any] = {}
        self.failed: Optional[fx.Node] = None

    def module_at(self, target: str) -> Any:
        """The model's own module (or attribute) at a node's ``target``."""
        module = self.submodules.get(target)
        return module if module is not None else super().fetch_attr(target)

    def run_node(self, n: fx.Node) -> Any:
        # Interpreter.run_node without its per-node debug log and node-meta context, which
        # only matter when the run is itself being traced.
        try:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            result = getattr(self, n.op)(n.target, args, kwargs)
        except Exception:
            self.failed = self.failed or n
            raise
        self.values[n.name] = describe(result)
        return result


def _meta_tensor(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta


class _MetaRecorder(Recorder):
    """A Recorder whose modules and attributes are meta-tensor stand-ins for the model's."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        super().__init__(model, graph)
        self._standins: dict[int, Any] = {}  # id(real module or tensor) -> its meta stand-in

    def _standin(self, value: Any) -> Any:
        if not isinstance(value, (nn.Module, torch.Tensor)):
            return value
        found = self._standins.get(id(value))
        if found is not None:
            return found
        if isinstance(value, torch.Tensor):
            standin = _meta_tensor(value)
        else:  # a shallow copy with its own parameter, buffer and child dicts
            standin = copy.copy(value)
            standin.__dict__["_parameters"] = {k: self._standin(v) for k, v in value._parameters.items()}
            standin.__dict__["_buffers"] = {k: self._standin(v) for k, v in value._buffers.items()}
            standin.__dict__["_modules"] = {k: self._standin(v) for k, v in value._modules.items()}
        self._standins[id(value)] = standin
        return standin

    def fetch_attr(self, target: str) -> Any:
        return self._standin(self.module_at(target))

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        module = self.module_at(target)
        shortcut = _on_meta(args, kwargs) and not forward_hooks(module)  # hooks must run
        output = module_output(module, args, kwargs) if shortcut else None
        return output if output is not None else super().call_module(target, args, kwargs)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        # Only meta inputs: tensors the forward creates on a real device hold values it may use.
        output = function_output(target, args, kwargs) if _on_meta(args, kwargs) else None
        return output if output is not None else super().call_function(target, args, kwargs)


def _on_meta(args: tuple, kwargs: dict) -> bool:
    """Whether every tensor among the arguments (and in lists of them) is a meta tensor."""
    values = [*args, *kwargs.values()]
    values += [item for v in values if isinstance(v, (list, tuple)) for item in v]
    return all(v.device.type == "meta" for v in values if isinstance(v, torch.Tensor))


def record_on_meta(model: nn.Module, graph: fx.Graph, args: tuple, failures: Optional[list] = None) -> Optional[Recorder]:
    """Run ``graph`` on meta stand-ins of ``model``'s tensors and of ``args``; None if it cannot.

    Code that needs actual values (``.item()``, data-dependent shapes such as ``nonzero``,
    numpy, tensors it creates on the CPU) raises on meta tensors; the caller then runs a
    :class:`Recorder` on the real inputs.
    """
    recorder = _MetaRecorder(model, graph)
    try:
        with torch.no_grad():
            recorder.run(*tree_map_only(torch.Tensor, lambda t: t.to("meta"), args))
    except Exception as exc:
        if failures is not None:
            failures.append((recorder.failed, exc))  # ``(node, exception)``
        return None
    return recorder


def fails_alike(node: Optional[fx.Node], exc: BaseException) -> bool:
    """Whether a run on the real inputs would fail as the meta run failed at ``node``: a Python
    function or method given an argument of the wrong type (a TypeError or AttributeError: the
    trace took a path the run does not, as ``~None``), with nothing in the error about the meta
    device, its missing values or kernels. A module's failure may be its meta stand-in's."""
    if node is None or node.op not in ("call_function", "call_method") or not isinstance(exc, (TypeError, AttributeError)):
        return False
    while exc is not None:
        text = str(exc).lower()
        if isinstance(exc, NotImplementedError) or "meta" in text or "data-dependent" in text or "device" in text:
            return False
        exc = exc.__cause__ or exc.__context__
    return True
