"""The optimizer's state after a pruning: :func:`prune_optimizer_state` slices it to the
positions kept, so that training goes on with the pruned parameters (re-exported by
:mod:`graphprune.workflow.callbacks`, whose callbacks call it after each pruning)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from graphprune.validation import check_bool, check_model

__all__ = ["prune_optimizer_state"]


def prune_optimizer_state(optimizer: Any, model: nn.Module, kept: Mapping, *, reset_unknown: bool = False) -> int:
    """Slice ``optimizer``'s state to the positions a pruning of ``model`` kept.

    The surgery keeps the Parameter objects (it replaces ``param.data``); each state tensor
    of a pruned parameter shaped as it was (``exp_avg``, ``momentum_buffer`` ...) becomes its
    kept positions. Scalars (Adam's ``step``) and states already shaped like their parameter
    stay (a second call does nothing). Any other state tensor (Adafactor's factored ones)
    raises ValueError before anything changes, unless ``reset_unknown``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Any object with ``.state`` and ``.param_groups``; its state is changed in place.
    model : nn.Module
        The model that was pruned.
    kept : mapping
        ``{(module name, attribute): {dim: kept positions}}`` of the tensors before that
        pruning, as ``report.session.surgery.kept_positions()`` gives after
        ``graphprune.prune(model, ..., report=report)``.
    reset_unknown : bool, default False
        Drop the state of a parameter whose state no slice fits instead of raising; the
        optimizer starts it afresh at its next step.

    Returns
    -------
    int
        How many state tensors were sliced.

    Raises
    ------
    TypeError
        ``optimizer``, ``kept`` or ``reset_unknown`` has the wrong type.
    ValueError
        ``kept`` names no parameter or buffer of ``model``, or a state tensor fits no slice
        (without ``reset_unknown``).
    """
    check_model(model)
    if not isinstance(getattr(optimizer, "state", None), Mapping) or not isinstance(
            getattr(optimizer, "param_groups", None), list):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (with .state and .param_groups), "
                        f"got {type(optimizer).__name__}")
    check_bool(reset_unknown, "reset_unknown")
    plan, resets = _state_plan(optimizer, _pruned_parameters(model, kept), reset_unknown)
    for parameter, key, dims in plan:
        value = optimizer.state[parameter][key]
        for dim, index in dims.items():
            value = value.index_select(dim, index.to(value.device))
        optimizer.state[parameter][key] = value.contiguous()
    for parameter in resets:
        del optimizer.state[parameter]
    return len(plan)


def _state_plan(optimizer: Any, pruned: list, reset_unknown: bool) -> tuple:
    """``([(parameter, state key, dims) to slice], [parameters whose state to drop])``."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    plan, resets = [], {}
    for parameter, name, dims in pruned:
        if id(parameter) not in held or parameter not in optimizer.state:
            continue
        for key, value in optimizer.state[parameter].items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape == parameter.shape:
                continue
            if _fits(value, parameter, dims):
                plan.append((parameter, key, dims))
            elif value.numel() != 1:  # a 1-element state is a scalar too
                if not reset_unknown:
                    raise ValueError(
                        f"optimizer state {key!r} of {name} has shape {tuple(value.shape)}, neither the parameter's "
                        f"shape before pruning nor a scalar (the parameter is now {tuple(parameter.shape)}; a factored "
                        "state such as Adafactor's?); pass reset_unknown=True to drop that parameter's state")
                resets[id(parameter)] = parameter
    return [entry for entry in plan if id(entry[0]) not in resets], list(resets.values())


def _pruned_parameters(model: nn.Module, kept: Mapping) -> list:
    """``(parameter, name, {dim: positions as an int64 tensor})`` of every parameter ``kept``
    names, once each (a tied parameter under each of its owners is one parameter)."""
    if not isinstance(kept, Mapping):
        raise TypeError(f"kept must be a mapping {{(module name, attribute): {{dim: positions}}}}, "
                        f"got {type(kept).__name__}")
    found: dict = {}
    for key, dims in kept.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
            raise TypeError(f"kept's keys must be (module name, attribute) pairs of strings, got {key!r}")
        try:
            module = model.get_submodule(key[0])
        except AttributeError:
            module = None
        if module is not None and key[1] in module._buffers:
            continue
        parameter = None if module is None else module._parameters.get(key[1])
        if parameter is None:
            raise ValueError(f"kept names {'.'.join(filter(None, key))}, which is no parameter or buffer of "
                             f"{type(model).__name__}; pass the model that was pruned")
        index = {int(d): torch.as_tensor(np.asarray(p, dtype=np.int64)) for d, p in dims.items()}
        found.setdefault(id(parameter), (parameter, ".".join(filter(None, key)), index))
    return list(found.values())


def _fits(value: torch.Tensor, parameter: nn.Parameter, dims: dict) -> bool:
    """Whether ``value`` is shaped like ``parameter`` was before the pruning that kept ``dims``."""
    return value.dim() == parameter.dim() and all(
        value.shape[dim] == size if dim not in dims
        else dims[dim].numel() == size and int(dims[dim].max()) < value.shape[dim]
        for dim, size in enumerate(parameter.shape))
