"""Run a captured graph node by node and record every node's output shape.

:func:`record_on_meta` runs on meta tensors: every parameter, buffer and input is replaced
by an empty meta tensor of the same shape, so nothing is copied or computed. Modules are
called through lightweight clones that hold those meta tensors; the user's modules are
never touched. Modules listed in :data:`OUTPUT_SHAPES` are not run at all: their output is
a fresh tensor of the shape the table gives (their meta kernels are Python decompositions
that cost more than the rest of the run). :class:`Recorder` runs on whatever tensors it is given.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map_only


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

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception:
            self.failed = self.failed or n
            raise
        self.values[n.name] = describe(result)
        return result


def _elementwise(module: nn.Module, x: torch.Tensor) -> Optional[tuple]:
    return tuple(x.shape) if x.is_floating_point() else None


def _weight_dtype_matches(module: nn.Module, x: torch.Tensor) -> bool:
    weight = getattr(module, "weight", None)
    return x.is_floating_point() and (weight is None or weight.dtype == x.dtype)


def _batch_norm(dims: tuple) -> Callable[[nn.Module, torch.Tensor], Optional[tuple]]:
    def shape(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> Optional[tuple]:
        ok = _weight_dtype_matches(module, x) and x.dim() in dims and x.shape[1] == module.num_features
        return tuple(x.shape) if ok else None

    return shape


def _group_norm(module: nn.GroupNorm, x: torch.Tensor) -> Optional[tuple]:
    ok = _weight_dtype_matches(module, x) and x.dim() >= 2 and x.shape[1] == module.num_channels
    return tuple(x.shape) if ok else None


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> Optional[tuple]:
    normalized = tuple(module.normalized_shape)
    ok = _weight_dtype_matches(module, x) and x.dim() >= len(normalized) and tuple(x.shape[x.dim() - len(normalized):]) == normalized
    return tuple(x.shape) if ok else None


def _linear(module: nn.Linear, x: torch.Tensor) -> Optional[tuple]:
    ok = _weight_dtype_matches(module, x) and x.dim() >= 1 and x.shape[-1] == module.in_features
    return (*x.shape[:-1], module.out_features) if ok else None


# Output shapes of module types (exact types: a subclass may override forward) that take one
# tensor, for inputs the function accepts (else it returns None and the module itself runs,
# so that a bad input fails exactly as it does in the model). Their meta kernels are Python
# decompositions that cost more than the rest of the run.
OUTPUT_SHAPES: dict[type, Callable[[Any, torch.Tensor], Optional[tuple]]] = {
    nn.BatchNorm1d: _batch_norm((2, 3)),
    nn.BatchNorm2d: _batch_norm((4,)),
    nn.BatchNorm3d: _batch_norm((5,)),
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Linear: _linear,
    **dict.fromkeys(
        (
            nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
            nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
            nn.Dropout, nn.AlphaDropout, nn.Identity,
        ),
        _elementwise,
    ),
}


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
        return self._standin(super().fetch_attr(target))

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        module = super().fetch_attr(target)
        rule = OUTPUT_SHAPES.get(type(module))
        if (
            rule is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
            and not (module._forward_hooks or module._forward_pre_hooks)
        ):
            x = args[0]
            shape = rule(module, x)
            if shape == tuple(x.shape):
                return torch.empty_like(x)
            if shape is not None:
                return torch.empty(shape, dtype=x.dtype, device=x.device)
        return super().call_module(target, args, kwargs)


def record_on_meta(model: nn.Module, graph: fx.Graph, args: tuple) -> Optional[Recorder]:
    """Run ``graph`` on meta stand-ins of ``model``'s tensors and of ``args``; None if it cannot.

    Code that needs actual values (``.item()``, data-dependent shapes such as ``nonzero``,
    numpy, tensors it creates on the CPU) raises on meta tensors; the caller then runs a
    :class:`Recorder` on the real inputs.
    """
    recorder = _MetaRecorder(model, graph)
    try:
        with torch.no_grad():
            recorder.run(*tree_map_only(torch.Tensor, lambda t: t.to("meta"), args))
    except Exception:
        return None
    return recorder
