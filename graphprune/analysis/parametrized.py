"""Weights a parametrization computes on each call (``torch.nn.utils.parametrizations``):
``weight_norm``'s ``g · v / ‖v‖`` and ``spectral_norm``'s ``W / σ(W)``. The computed weight is
no parameter; the tensors it is computed from are, and they prune in its place, each dim
with the weight's dim it follows. Removing a channel no consumer reads (zero columns) leaves
the norms as they were, and so does removing a row of ``weight_norm`` (each row has its own
norm); rows of ``spectral_norm`` share ``σ``, so removing them is approximate (a note).

Only the parametrizations in :data:`FOLLOWERS` are known: another one may mix channels
(``orthogonal``), so its weight blocks, as any weight computed on each call does.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, _WeightNorm


def parametrized_weights(modules: dict[str, nn.Module]) -> dict[int, tuple]:
    """``{id(weight): (module, attribute)}`` for every parametrized tensor of ``modules``, as
    computed now: call it inside ``parametrize.cached()``, where it stays the same tensor."""
    found = {}
    for module in modules.values():
        if parametrize.is_parametrized(module):
            for attr in module.parametrizations:
                found[id(getattr(module, attr))] = (module, attr)
    return found


def _weight_norm(bind: Callable, chain: nn.ModuleList, weight: torch.Tensor, dim: int) -> Optional[str]:
    """``g`` (``original0``, size 1 but along its ``dim``) and ``v`` (``original1``, the weight's shape)."""
    for tensor in (chain.original0, chain.original1):
        if tensor.shape[dim] == weight.shape[dim]:
            bind(tensor, dim, None)
    return None


def _spectral_norm(bind: Callable, chain: nn.ModuleList, weight: torch.Tensor, dim: int) -> Optional[str]:
    """``original`` (the weight's shape) and the power iteration's vectors: ``_u`` along the
    norm's ``dim``, ``_v`` along the other dims flattened in order."""
    norm = chain[0]
    bind(chain.original, dim, None)
    if dim == norm.dim:
        bind(norm._u, 0, None)
        return "spectral_norm's σ changes when its rows go"
    others = [d for d in range(weight.dim()) if d != norm.dim]
    at = others.index(dim)
    before = int(np.prod([weight.shape[d] for d in others[:at]]))
    after = int(np.prod([weight.shape[d] for d in others[at + 1 :]]))
    bind(norm._v, 0, lambda ids: np.tile(np.repeat(ids, after), before))
    return None


#: parametrization class -> how the computed weight's dims map to the tensors it is made from,
#: and which of those has the weight's shape
FOLLOWERS: dict[type, tuple[Callable, str]] = {_WeightNorm: (_weight_norm, "original1"),
                                              _SpectralNorm: (_spectral_norm, "original")}


def shaped_like(module: nn.Module, attr: str) -> Optional[str]:
    """The path, within ``module``, of the tensor whose shape its parametrized ``attr`` has
    (None unless ``attr`` is computed by one parametrization of :data:`FOLLOWERS`)."""
    if not parametrize.is_parametrized(module, attr):
        return None
    chain = module.parametrizations[attr]
    known = FOLLOWERS.get(type(chain[0])) if len(chain) == 1 else None
    return f"parametrizations.{attr}.{known[1]}" if known else None


def follow(bind: Callable, module: nn.Module, attr: str, weight: torch.Tensor, dim: int) -> tuple:
    """Make ``bind(tensor, tensor dim, spread)`` tie dim ``dim`` of the computed ``weight`` to each
    tensor it is computed from (``spread`` maps the weight's ids to the tensor's positions).
    Returns ``(why it cannot, or None; why the pruning is approximate, or None)``: it cannot
    for a chain of parametrizations, or one not in :data:`FOLLOWERS`."""
    chain = module.parametrizations[attr]
    if len(chain) != 1 or type(chain[0]) not in FOLLOWERS:
        kinds = ", ".join(type(p).__name__ for p in chain)
        return f"{attr} is computed by a parametrization graphprune does not know ({kinds})", None
    return None, FOLLOWERS[type(chain[0])][0](bind, chain, weight, dim)

