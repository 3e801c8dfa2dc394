"""Rules for reshapes: view / reshape (and their ``_as`` forms), flatten and unflatten, and the
sizes their targets are written with.

A reshape keeps every position's identity when it merges or splits dims; a size in its
target shape must follow the pruning: read off a tensor's shape (a size constraint), held
in a module attribute (updated by surgery), or, under torch.export, taken to be read off a
shape as an assumption the shape audit checks. Any other literal blocks the dim.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx

from graphprune.analysis.channels import NO_ID
from graphprune.tracer import TensorSpec

from ..propagation import Propagation, SizeConstraint
from ..reasons import Assumption, BlockKind, Reason
from ..sizes import attributes_of_value, head_attributes
from ..source import names_in_statement, source_line

NEW_DIMENSION = Reason(BlockKind.NOT_A_CHANNEL, "reshape")  # a dimension a reshape creates, which carries no channel


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def carries_ids(state: Propagation, ids: np.ndarray) -> bool:
    """True if ``ids`` has an id whose set is not blocked (yet): it may be a channel."""
    ids = ids[ids >= 0]
    if not ids.size:
        return False
    return any(state.space.sets[s].blocked is None for s in np.unique(state.space.set_of(ids)))


def fresh_dims(state: Propagation, node: fx.Node, sizes: tuple, reason: Reason) -> tuple:
    return state.fresh(TensorSpec(tuple(sizes), None), node.name, reason)


def merge_dims(state: Propagation, node: fx.Node, x: tuple, start: int, end: int) -> tuple:
    """flatten: dims start..end become one; each position keeps its channel's id."""
    n = len(x)
    start, end = start % n if n else 0, end % n if n else 0
    merged = _merge(state, node, x[start : end + 1])
    return tuple(x[:start]) + (merged,) + tuple(x[end + 1 :])


def _merge(state: Propagation, node: fx.Node, parts: tuple) -> np.ndarray:
    sizes = [p.size for p in parts]
    carriers = [i for i, p in enumerate(parts) if p.size > 1 and carries_ids(state, p)]
    if len(carriers) > 1:  # a dim already tied to a blocked one never loses a position: it carries nothing
        carriers = [i for i in carriers if not state.space.blocked_by_links(parts[i])]
    if len(carriers) > 1:
        state.block(parts, Reason(BlockKind.RESHAPE, f"{node.name} merges two channel dimensions"))
    if len(carriers) != 1:
        total = math.prod(sizes)
        return np.array([NO_ID]) if total == 1 else state.space.new_set(total, f"{node.name} merged", NEW_DIMENSION)
    c = carriers[0]
    inner = math.prod(sizes[c + 1 :])
    outer = math.prod(sizes[:c])
    return np.tile(np.repeat(parts[c], inner), outer)


def _head_split(state: Propagation, node: fx.Node, sizes: tuple) -> Optional[tuple]:
    """``(heads axis, width axis, HeadAttributes)`` when a split ends in ``(…, heads, width)``
    that the calling module declares as its attention heads (:data:`HEAD_ATTRIBUTES`)."""
    axes = [i for i, s in enumerate(sizes) if s > 1]
    if len(axes) < 2:
        return None
    pair = head_attributes(state.module(state.qualname(node)), sizes[axes[-2]], sizes[axes[-1]])
    return (axes[-2], axes[-1], pair) if pair is not None else None


def _split(state: Propagation, node: fx.Node, ids: np.ndarray, sizes: tuple, pairs: bool = False) -> tuple:
    """One dim becomes several: one axis carries the ids and the positions along the others
    are tied to it. Returns the labels of the axes and ``{axis: attribute}`` for the carrier
    when a module attribute holds its size. The carrier is the innermost non-1 axis, except
    in a split into attention heads with ``prune_heads``: then the heads axis carries (whole
    heads go) and the head-count attribute follows it; otherwise the width attribute. With
    ``pairs`` (the last axis, of size 2, becomes the two parts of complex numbers) the axis
    before it carries: a pair is one unit. Ids that vary along one axis only (a dim merged
    with spatial positions, split again) keep it as the carrier: nothing is tied."""
    if not carries_ids(state, ids):
        return fresh_dims(state, node, sizes, NEW_DIMENSION), {}
    grid = ids.reshape(sizes)
    axes = [i for i, s in enumerate(sizes) if s > 1]
    varying = [a for a in axes if (np.diff(grid, axis=a) != 0).any()]
    pairs = pairs and len(axes) > 1 and axes[-1] == len(sizes) - 1 and sizes[-1] == 2
    heads = None if pairs else _head_split(state, node, sizes)
    carrier = axes[-2] if pairs else varying[0] if len(varying) == 1 else axes[-1]
    followed = {}
    if heads is not None:
        carrier = heads[0] if state.prune_heads else heads[1]
        followed = {carrier: heads[2].count if state.prune_heads else heads[2].width}
    index = [0] * len(sizes)
    index[carrier] = slice(None)
    anchor = grid[tuple(index)]
    state.unify(grid, np.broadcast_to(anchor.reshape([-1 if i == carrier else 1 for i in range(len(sizes))]), grid.shape))
    fresh = fresh_dims(state, node, sizes, Reason(BlockKind.RESHAPE, f"{node.name} splits a channel dimension"))
    return tuple(anchor if i == carrier else fresh[i] for i in range(len(sizes))), followed


def _dim_groups(a: tuple, b: tuple) -> Optional[list]:
    """Pair consecutive dims of shapes ``a`` and ``b`` (size-1 dims ignored) with equal products."""
    ia = [i for i, s in enumerate(a) if s != 1]
    ib = [j for j, s in enumerate(b) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ia) and j < len(ib):
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i == len(ia):
                    return None
                ga.append(ia[i]); pa *= a[ia[i]]; i += 1  # noqa: E702
            else:
                if j == len(ib):
                    return None
                gb.append(ib[j]); pb *= b[ib[j]]; j += 1  # noqa: E702
        groups.append((ga, gb))
    return groups if i == len(ia) and j == len(ib) else None


_CASTS = ("float", "double", "to", "contiguous", "type_as")


def _makes_complex(node: fx.Node) -> bool:
    """Whether every use of ``node``, through dtype casts, is ``torch.view_as_complex`` (Llama's
    rotary embeddings: ``view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))``)."""
    users = list(node.users)
    return bool(users) and all(
        u.target is torch.view_as_complex or u.op == "call_method" and u.target in _CASTS and _makes_complex(u)
        for u in users)


def reshape_labels(state: Propagation, node: fx.Node, x: tuple, in_shape: tuple, out_shape: tuple, size_args: Optional[list]) -> tuple:
    groups = _dim_groups(in_shape, out_shape)
    out: list = [np.array([NO_ID]) for _ in out_shape]
    if groups is None:
        state.block(x, Reason(BlockKind.RESHAPE, f"{node.name}: reshape not understood"))
        return fresh_dims(state, node, out_shape, NEW_DIMENSION)
    followed = {}  # out dim -> the module attribute holding its size
    pairs = _makes_complex(node)
    for ga, gb in groups:
        if len(gb) == 1:
            out[gb[0]] = x[ga[0]] if len(ga) == 1 else _merge(state, node, tuple(x[d] for d in ga))
        elif len(ga) == 1:
            last = pairs and gb[-1] == len(out_shape) - 1
            parts, attrs = _split(state, node, x[ga[0]], tuple(out_shape[d] for d in gb), last)
            for d, ids in zip(gb, parts):
                out[d] = ids
            followed.update({gb[axis]: attr for axis, attr in attrs.items()})
        else:
            state.block(tuple(x[d] for d in ga), Reason(BlockKind.RESHAPE, f"{node.name} regroups several dimensions"))
            for d, ids in zip(gb, fresh_dims(state, node, tuple(out_shape[d] for d in gb), NEW_DIMENSION)):
                out[d] = ids
    if size_args is not None:
        follow_sizes(state, node, out, out_shape, size_args, followed)
    return tuple(out)


def follow_sizes(state: Propagation, node: fx.Node, out: list, shape: tuple, size_args: list,
                 followed: Optional[dict] = None) -> None:
    """Make each dim ``d`` of the new tensor ``out`` (labels, of ``shape``) follow the size it was
    given, ``size_args[d]``: a literal (:func:`literal_size`; ``followed`` names the module
    attribute known to hold it) or a size read off a shape (:func:`_size_from_shape`)."""
    for d, arg in enumerate(size_args):
        if isinstance(arg, int) and arg != -1 and shape[d] > 1:
            literal_size(state, node, out[d], arg, "in its target shape", (followed or {}).get(d))
        elif isinstance(arg, (fx.Node, tuple)) and shape[d] > 1:  # a size node, or where one was read
            _size_from_shape(state, node, out[d], state.size_source(arg) if isinstance(arg, fx.Node) else arg)


def _size_from_shape(state: Propagation, node: fx.Node, ids: np.ndarray, source) -> None:
    """A target size read off a tensor's dim (``source``: its ids and a divisor) must stay
    equal to it once pruned: a :class:`SizeConstraint`, enforced once every rule has run
    (:func:`graphprune.analysis.propagate.enforce_sizes`). A size computed some other way
    cannot be followed: the dim blocks."""
    if source is None or not isinstance(source[0], np.ndarray):
        state.block(ids, Reason(BlockKind.FIXED_SIZE, f"{node.name}: a target size that no tensor's shape gives"))
        return
    source_ids, divisor = source
    if source_ids.size != ids.size * divisor:
        state.block((ids, source_ids), Reason(BlockKind.RESHAPE, f"{node.name}: a target size that does not divide its source"))
        return
    state.size_constraints.append(SizeConstraint(ids, source_ids, divisor, node.name))


def literal_size(state: Propagation, node: fx.Node, ids: np.ndarray, size: int, where: str,
                 attribute: Optional[str] = None) -> None:
    """A literal size on a dim carrying ids: follow it if it is the value of ``attribute`` on
    the calling module (a head count or width, see :data:`HEAD_ATTRIBUTES`), or without one,
    the one int attribute that may hold it there (:func:`attributes_holding`; updated by
    surgery); otherwise block the dim.
    Under torch.export, which records every size as a number, such a size is taken to be read
    off a shape, as an assumption that the shape audit checks (see ``Group.assumptions``)."""
    scope = state.qualname(node)
    module = state.module(scope)
    if attribute is not None:
        matches = [attribute] if vars(module).get(attribute) == size else []
    else:
        matches = attributes_holding(state, node, size)
    if len(matches) == 1 and carries_ids(state, ids):
        state.attr(scope, matches[0], ids, lambda _, kept: kept)
    elif not assume_read_off_shape(state, node, ids, size, where):
        state.block(ids, Reason(BlockKind.FIXED_SIZE, f"{node.name} has a fixed size {size} {where}"))


def attributes_holding(state: Propagation, node: fx.Node, size: int, exclude: tuple = ()) -> list:
    """The int attributes (but ``exclude``) of the module calling ``node`` that may hold its
    literal ``size`` of a pruned dim: those of that value, and where the node's source is
    known only those its statement names (:func:`~graphprune.analysis.source.names_in_statement`:
    a Llama layer's ``layer_idx`` 4 is not its 4 key/value heads)."""
    module = state.module(state.qualname(node))
    names = attributes_of_value(module, size, exclude)
    named = names_in_statement(node) if names else None
    return names if named is None else [name for name in names if name in named]


def assume_read_off_shape(state: Propagation, node: fx.Node, ids: np.ndarray, size: int, where: str) -> bool:
    """Under torch.export, which records every size as a number, take the number ``size`` on
    the channel dim ``ids`` to be read off a shape: recorded as an assumption the shape audit
    checks (see ``Group.assumptions``); returns whether it was (never under torch.fx)."""
    if state.node_attrs(node).get("front_end") != "export" or not carries_ids(state, ids):
        return False
    state.assume(ids, Assumption(f"{node.name}: torch.export recorded the size {size} {where} as a number; it is "
                                 "taken to be read off a shape, which only the shape audit can confirm",
                                 source_line(node), state.qualname(node) or ""))
    return True


def shape_args(node: fx.Node, first: int) -> list:
    rest = list(node.args[first:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0])
    return rest


def _target_sizes(state: Propagation, node: fx.Node) -> list:
    """A reshape's target sizes, one per output dim; a whole shape computed in the graph
    (``x.size()[:-1] + (n,)``) gives where each of its sizes was read, or, where that is
    unknown, the node itself for each (so that no channel dim trusts it)."""
    sizes = shape_args(node, 1)
    if len(sizes) != 1 or not isinstance(sizes[0], fx.Node) or not isinstance(state.value(sizes[0]), (tuple, list)):
        return sizes
    whole = state.size_source(sizes[0])
    if isinstance(whole, tuple) and len(whole) == len(state.value(node).shape):
        return list(whole)
    return [sizes[0]] * len(state.value(node).shape)


def view(state: Propagation, node: fx.Node):
    x = state.labels_of(node.args[0])
    in_spec, out_spec = state.value(node.args[0]), state.value(node)
    return reshape_labels(state, node, x, in_spec.shape, out_spec.shape, _target_sizes(state, node))


def view_as(state: Propagation, node: fx.Node):
    """``x.view_as(other)`` / ``x.reshape_as(other)``: a reshape to ``other``'s shape, which is
    whatever ``other`` has after pruning, so no size in it is a literal."""
    x, other = state.labels_of(node.args[0]), state.labels_of(node.args[1])
    in_spec, out_spec = state.value(node.args[0]), state.value(node)
    out = reshape_labels(state, node, x, in_spec.shape, out_spec.shape, None)
    for ids, like in zip(out, other or ()):
        if ids.size > 1 and ids.size == like.size:
            state.unify(ids, like)  # the shapes stay equal only if the dims prune together
    return out


def flatten(state: Propagation, node: fx.Node):
    x = state.labels_of(node.args[0])
    return merge_dims(state, node, x, arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1))


def unflatten(state: Propagation, node: fx.Node):
    x = state.labels_of(node.args[0])
    in_spec, out_spec = state.value(node.args[0]), state.value(node)
    dim = arg(node, 1, "dim") % len(x)
    sizes = list(arg(node, 2, "sizes"))
    size_args = [None] * dim + sizes + [None] * (len(out_spec.shape) - dim - len(sizes))
    return reshape_labels(state, node, x, in_spec.shape, out_spec.shape, size_args)


def view_as_complex(state: Propagation, node: fx.Node):
    """``torch.view_as_complex(x)``: the last dim (size 2) becomes the real and imaginary parts
    of one value, so it carries no channel (a reshape feeding it keeps a pair as one unit, see
    :func:`reshape_labels`); the other dims pass."""
    x = state.labels_of(node.args[0])
    state.block(x[-1], Reason(BlockKind.COLLAPSED, f"{node.name} makes complex numbers of this dimension's pairs"))
    return x[:-1]


def view_as_real(state: Propagation, node: fx.Node):
    """``torch.view_as_real(x)``: the dims pass, and a new last dim holds each value's real and
    imaginary parts (no channel)."""
    x = state.labels_of(node.args[0])
    return tuple(x) + fresh_dims(state, node, (2,), Reason(BlockKind.NOT_A_CHANNEL, "real and imaginary parts"))
