"""Trained weights for a freshly built model, from the files people have.

:func:`load_weights` reads a ``state_dict`` saved with ``torch.save`` (``.pt``, ``.pth``,
``.bin``, ``.ckpt``; read with ``weights_only=True``, so nothing is unpickled but tensors and
plain containers) or a ``.safetensors`` file, as torchvision, timm, Hugging Face, Lightning and
DDP write them: the tensors may sit under a key such as ``"state_dict"`` or ``"model"``, and
their names may carry a prefix the model's own lack (``module.``, ``model.``, ``_orig_mod.``).
A :func:`graphprune.save` file (a pruned model) is loaded with :func:`graphprune.load`.
Every name and shape is checked before the model changes; a mismatch raises ValueError naming
the first few tensors.
"""
from __future__ import annotations

import os
from typing import Union

import torch
from torch import nn

_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema", "ema", "net")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_SHOWN = 5


def load_weights(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (in place) and return it; see the module doc."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no such weights file: {path!r}")
    if path.endswith(".safetensors") and is_graphprune_file(path):
        from .persist import load

        return load(model, path)
    state = _unwrapped(_read(path), path)
    state = _renamed(state, set(model.state_dict()))
    _check_matches(model, state, path)
    with torch.no_grad():
        model.load_state_dict(state, strict=False)  # checked above, more strictly
    return model


def is_graphprune_file(path: str) -> bool:
    """Whether the safetensors file ``path`` was written by :func:`graphprune.save` (it holds
    graphprune's pruning spec); ValueError if it is no readable safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return "graphprune.spec" in (handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types
        raise ValueError(f"{path!r} is not a readable safetensors file: {exc}") from None


def _read(path: str) -> object:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refusals and corrupt files alike
        raise ValueError(f"{path!r} cannot be read as weights with torch.load(weights_only=True): "
                         f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]} (save model.state_dict(), "
                         "or a .safetensors file)") from None


def _is_state_dict(value: object) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _unwrapped(value: object, path: str) -> dict:
    """The ``{name: tensor}`` inside what the file holds: itself, or under a wrapper key."""
    if isinstance(value, nn.Module):
        value = value.state_dict()
    if _is_state_dict(value):
        return dict(value)
    if isinstance(value, dict):
        for key in _WRAPPERS:
            if _is_state_dict(value.get(key)):
                return dict(value[key])
        found = ", ".join(repr(k) for k in list(value)[:8])
        raise ValueError(f"{path!r} holds a dict ({found}) with no state_dict of tensors under any of "
                         f"{', '.join(repr(k) for k in _WRAPPERS)}")
    raise ValueError(f"{path!r} holds a {type(value).__name__}, not a state_dict (a dict of tensors)")


def _renamed(state: dict, wanted: set) -> dict:
    """``state`` with a prefix that every name has and the model's names lack removed (DDP's
    ``module.``, torch.compile's ``_orig_mod.``, Lightning's ``model.``), as long as it helps."""
    changed = True
    while changed and not set(state) <= wanted:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix):]: v for k, v in state.items()}
                if len(set(stripped) & wanted) > len(set(state) & wanted):
                    state, changed = stripped, True
    return state


def _check_matches(model: nn.Module, state: dict, path: str) -> None:
    own = model.state_dict()
    name = type(model).__name__
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]  # older files lack it
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} in the file, {list(own[k].shape)} in {name}"
              for k in state if k in own and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {name}'s tensors are not in the file: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of the file are not in {name}: {_few(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} tensors differ in shape: {_few(shapes)}")
    if problems:
        raise ValueError(f"{path!r} does not hold {name}'s weights: " + "; ".join(problems)
                         + " (built with other options, e.g. num_classes?)")


def _few(items: list) -> str:
    return ", ".join(items[:_SHOWN]) + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")
