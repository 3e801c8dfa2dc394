"""Layers the traced forward never calls: a branch taken only in training (GoogLeNet's and
Inception's auxiliary heads, a detector's per-layer training heads), or on other inputs.

Their inputs are not in the graph, so nothing says which channels they read; pruning the
channels they read would break them. Such a layer is found by its parameters: no rule read
them and no module call holding them was traced. The model is then run once in training mode
(without gradients, everything it changes taken back) to tell a training-only layer from one
that is never used; where that run fails, every unreached layer counts. Each group with a
member of the width of such a layer's parameters is blocked: nothing is guessed."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from graphprune.tracer import call_model
from graphprune.tracer.state import attributes_kept, training_flags_kept

from .propagation import Propagation
from .reasons import BlockKind, Reason


def unreached_layers(state: Propagation) -> dict[str, nn.Module]:
    """The modules holding floating-point parameters of their own, none of which the graph
    reads: neither a rule, nor a module call in the graph, nor a module left opaque (called by
    code that was not traced, whose channels block where they cross it) holds them."""
    reached = {key[0] for key in state.param_dims}
    called = [attrs["module"] for _, attrs in state.graph.nodes(data=True) if attrs["op"] == "call_module"]
    for name in called + list(state.graph.graph.get("opaque", {})):
        module = state.module(name)
        reached.update(id(p) for p in (module.parameters() if name else module.parameters(recurse=False)))
    found = {}
    for name, module in state.model.named_modules():
        own = [p for p in module._parameters.values() if p is not None and p.is_floating_point()]
        if own and not any(id(p) in reached for p in own):
            found[name] = module
    return found


def called_in_training(model: nn.Module, example_inputs: Any, modules: dict[str, nn.Module]) -> Optional[set]:
    """The names of ``modules`` that a forward in training mode calls, or None if that run fails.
    Whatever the run changes (statistics, attributes, the random state) is taken back."""
    called: set = set()
    handles = [m.register_forward_pre_hook(lambda *_, name=name: called.add(name)) for name, m in modules.items()]
    try:
        with torch.random.fork_rng(devices=[]), training_flags_kept(model), attributes_kept(model), torch.no_grad():
            model.train()
            call_model(model, example_inputs)
    except Exception:  # noqa: BLE001 - training mode may need other inputs (targets): count every layer
        return None
    finally:
        for handle in handles:
            handle.remove()
    return called


def block_unreached(state: Propagation, example_inputs: Any) -> None:
    """Block every group with a member as wide as a parameter of a layer the graph never calls
    but a forward in training mode does (or may: see the module docstring)."""
    unreached = unreached_layers(state)
    if not unreached:
        return
    called = called_in_training(state.model, example_inputs, unreached)
    suspects = {n: m for n, m in unreached.items() if called is None or n in called}
    widths: dict[int, str] = {}
    for name, module in suspects.items():
        for tensor in module._parameters.values():
            for size in tensor.shape if tensor is not None else ():
                widths.setdefault(int(size), f"{name} ({type(module).__name__})")
    if called is not None:
        why = "runs in training mode but not in the traced forward (a training-only branch)"
    else:
        why = "is never called by the traced forward, and a run in training mode failed to tell whether it is used"
    for member in state.param_dims.values():
        layer = widths.get(int(member.tensor.shape[member.dim]))
        if layer is not None and member.tensor.shape[member.dim] > 1:
            state.space.block(member.ids, Reason(BlockKind.UNTRACED_OUTPUT, f"{layer} {why}; it may read these channels"))
