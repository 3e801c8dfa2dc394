"""Group norm: the L2 norm of each channel taken over every parameter of its group.

This is the quantity group-level sparse training (DepGraph, Fang et al., CVPR 2023) drives
toward zero, and what :class:`graphprune.workflow.sparse.GroupRegularizer` penalises: for
channel ``c`` of a group, the square root of the sum of the squares of every entry of every
parameter member whose position along the member's dim maps to ``c`` (producer rows, biases,
norm scales and shifts, consumer columns, parameters read directly). Buffers (running
statistics) are left out, and each ``(tensor, dim)`` counts once, however many names a tied
weight has. Unlike the other criteria, members are not normalised one by one: a channel that
sparse training emptied in every member scores exactly 0.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from .base import Criterion

__all__ = ["GroupL2Norm", "norm_members", "channel_sums", "group_norms"]


def norm_members(group) -> list:
    """The members a group norm reads: each parameter ``(tensor, dim)`` once, in member order;
    buffers and empty tensors are left out."""
    seen, found = set(), []
    for member in group.members:
        key = (id(member.tensor), member.dim)
        if isinstance(member.tensor, nn.Parameter) and member.tensor.numel() and key not in seen:
            seen.add(key)
            found.append(member)
    return found


def channel_sums(tensor: torch.Tensor, dim: int, index: torch.Tensor, size: int, p: int = 2) -> torch.Tensor:
    """Per group channel, the sum of ``|x| ** p`` over the entries of ``tensor`` whose position
    along ``dim`` maps to it (``index[position]`` is the channel). Differentiable; summed in
    at least float32."""
    values = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
    powers = values.square() if p == 2 else values.abs()
    others = [d for d in range(tensor.dim()) if d != dim]
    per_position = powers.sum(others) if others else powers
    return per_position.new_zeros(size).index_add(0, index, per_position)


def group_norms(entries: Iterable[tuple], size: int) -> torch.Tensor:
    """The L2 norm of each of ``size`` channels over ``entries`` (``(tensor, dim, index)``
    triples). Differentiable, with a zero gradient at a channel whose norm is 0."""
    total: Optional[torch.Tensor] = None
    for tensor, dim, index in entries:
        sums = channel_sums(tensor, dim, index, size, 2)
        total = sums if total is None else total + sums.to(total.dtype)
    if total is None:
        return torch.zeros(size)
    positive = total > 0
    return torch.where(positive, torch.where(positive, total, torch.ones_like(total)).sqrt(), torch.zeros_like(total))


class GroupL2Norm(Criterion):
    """The L2 norm of each channel over all the parameters of its group (``"group_norm"``).

    Meant for models trained with :class:`graphprune.workflow.sparse.GroupRegularizer`: it
    scores channels by exactly the norm that regulariser shrinks, so the channels sparse
    training emptied are the ones pruned. It works on any model, like ``l2``, but without
    the per-member normalisation of :func:`~graphprune.criteria.base.combine`.
    """

    name = "group_norm"

    def scores(self, group) -> np.ndarray:
        with torch.no_grad():
            entries = [(m.tensor.detach(), m.dim, _index(m)) for m in norm_members(group)]
            return group_norms(entries, group.size).double().cpu().numpy()


def _index(member) -> torch.Tensor:
    return torch.as_tensor(np.asarray(member.index_map, dtype=np.int64), device=member.tensor.device)
