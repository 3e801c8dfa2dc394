"""Rules for ops that reorder, sample or accumulate positions along a dim: ``flip``,
``roll``, ``channel_shuffle``, ``cumsum`` and its kin, ``unfold`` / ``fold`` (im2col) and
``grid_sample``. A dim they only reverse or regroup keeps its channels (in the new order); a
dim whose positions they shift or accumulate cannot lose any without changing the others,
so it blocks; every other dim passes."""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from graphprune.analysis.propagation import Propagation

from ..reasons import BlockKind, Reason
from .reshape import arg, fresh_dims

_NEW = Reason(BlockKind.NOT_A_CHANNEL, "positions a sliding window or a sampling grid makes")


def _dims(node: fx.Node, index: int, name: str, ndim: int) -> list:
    dims = arg(node, index, name)
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return [d % ndim for d in dims if isinstance(d, int)]


def flip(state: Propagation, node: fx.Node):
    """``torch.flip(x, dims)``: the flipped dims carry their ids reversed (exact)."""
    x = list(state.labels_of(node.args[0]))
    for d in _dims(node, 1, "dims", len(x)):
        x[d] = x[d][::-1]
    return tuple(x)


def roll(state: Propagation, node: fx.Node):
    """``torch.roll(x, shifts, dims)``: a rolled dim wraps around its length, which pruning
    changes: it blocks (a shifted window's spatial dims never carry channels anyway)."""
    x = state.labels_of(node.args[0])
    dims = _dims(node, 2, "dims", len(x)) if arg(node, 2, "dims") is not None else range(len(x))
    for d in dims:
        state.block(x[d], Reason(BlockKind.COLLAPSED, f"{node.name} rolls this dimension around its length"))
    return x


def accumulate(state: Propagation, node: fx.Node):
    """``cumsum`` / ``cumprod`` / ``cummax`` / ``cummin`` / ``logcumsumexp`` over ``dim``: each
    position holds all before it, so that dim blocks; the others pass (``cummax`` also
    returns the positions, labelled alike)."""
    x = state.labels_of(node.args[0])
    dim = arg(node, 1, "dim") % len(x)
    state.block(x[dim], Reason(BlockKind.COLLAPSED, f"{node.name} accumulates along this dimension"))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return (x, x) if name in ("cummax", "cummin") else x


def channel_shuffle(state: Propagation, node: fx.Node):
    """``F.channel_shuffle(x, g)`` (ShuffleNet): the channels, read as ``(g, C / g)``, are
    transposed. Every group must keep as many channels, in the same places, so the d-th
    channel of every group is one unit; the output carries the ids transposed."""
    x = state.labels_of(node.args[0])
    groups = arg(node, 1, "groups")
    if node.op == "call_module":
        groups = state.module(state.qualname(node)).groups
    ids = x[1]
    if not isinstance(groups, int) or groups < 1 or ids.size % groups:
        state.block(x, Reason(BlockKind.NO_RULE, f"{node.name}: channel_shuffle with groups {groups!r}"))
        return state.fresh(state.value(node), node.name, Reason(BlockKind.NO_RULE, "channel_shuffle"))
    grid = ids.reshape(groups, ids.size // groups)
    state.unify(grid, np.broadcast_to(grid[:1], grid.shape))
    return x[:1] + (np.ascontiguousarray(grid.T).ravel(),) + tuple(x[2:])


def unfold(state: Propagation, node: fx.Node):
    """``F.unfold(x, kernel_size)`` (im2col): ``(N, C, …)`` becomes ``(N, C·k, L)``, channel
    ``c`` owning the ``k`` kernel positions ``c·k … c·k + k - 1``; the windows are new positions."""
    x = state.labels_of(node.args[0])
    out = state.value(node).shape
    per = out[1] // x[1].size if x[1].size and out[1] % x[1].size == 0 else 0
    if not per:
        state.block(x[1], Reason(BlockKind.RESHAPE, f"{node.name}: unfold not understood"))
        return fresh_dims(state, node, out, _NEW)
    state.block(x[2:], Reason(BlockKind.COLLAPSED, f"{node.name} slides a window over this dimension"))
    return (x[0], np.repeat(x[1], per)) + fresh_dims(state, node, out[2:], _NEW)


def fold(state: Propagation, node: fx.Node):
    """``F.fold(x, output_size, kernel_size)`` (col2im), the inverse of :func:`unfold`: the
    ``k`` kernel positions of a channel are one unit, and sum into its map."""
    x = state.labels_of(node.args[0])
    out = state.value(node).shape
    per = x[1].size // out[1] if out[1] and x[1].size % out[1] == 0 else 0
    if not per:
        state.block(x[1], Reason(BlockKind.RESHAPE, f"{node.name}: fold not understood"))
        return fresh_dims(state, node, out, _NEW)
    blocks = x[1].reshape(out[1], per)
    state.unify(blocks, np.broadcast_to(blocks[:, :1], blocks.shape))
    state.block(x[2:], Reason(BlockKind.COLLAPSED, f"{node.name} sums windows along this dimension"))
    return (x[0], np.ascontiguousarray(blocks[:, 0])) + fresh_dims(state, node, out[2:], _NEW)


def grid_sample(state: Propagation, node: fx.Node):
    """``F.grid_sample(x, grid)``: every channel is sampled at the grid's points: the batch and
    channel dims pass, the output's positions are the grid's, and the grid's last dim (the
    coordinates) is no channel dim."""
    x, grid = state.labels_of(node.args[0]), state.labels_of(arg(node, 1, "grid"))
    state.block(x[2:], Reason(BlockKind.COLLAPSED, f"{node.name} samples this dimension at computed points"))
    state.unify(x[0], grid[0])
    state.block(grid[-1], Reason(BlockKind.NOT_A_CHANNEL, f"{node.name} reads these as sampling coordinates"))
    return (x[0], x[1]) + tuple(grid[1:-1])

