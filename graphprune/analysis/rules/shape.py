"""Rules for ops that move, merge, split or select dimensions.

Exactness principle: a pruned tensor's dims shrink; these rules make sure every position
keeps its identity through the op. A size written as a literal in the traced code cannot
follow a pruned dimension, so a literal size on a dimension that carries ids blocks it.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch.fx as fx

from graphprune.analysis.channels import NO_ID
from graphprune.tracer import TensorSpec

from ..propagation import Propagation, SizeConstraint
from ..reasons import BlockKind, Reason
from ..sizes import head_attributes

NEW_DIMENSION = Reason(BlockKind.NOT_A_CHANNEL, "reshape")  # a dimension a reshape creates, which carries no channel


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _carries_ids(state: Propagation, ids: np.ndarray) -> bool:
    """True if ``ids`` has an id whose set is not blocked (yet): it may be a channel."""
    ids = ids[ids >= 0]
    if not ids.size:
        return False
    return any(state.space.sets[s].blocked is None for s in np.unique(state.space.set_of(ids)))


def _fresh_dims(state: Propagation, node: fx.Node, sizes: tuple, reason: Reason) -> tuple:
    return state.fresh(TensorSpec(tuple(sizes), None), node.name, reason)


def merge_dims(state: Propagation, node: fx.Node, x: tuple, start: int, end: int) -> tuple:
    """flatten: dims start..end become one; each position keeps its channel's id."""
    n = len(x)
    start, end = start % n if n else 0, end % n if n else 0
    merged = _merge(state, node, x[start : end + 1])
    return tuple(x[:start]) + (merged,) + tuple(x[end + 1 :])


def _merge(state: Propagation, node: fx.Node, parts: tuple) -> np.ndarray:
    sizes = [p.size for p in parts]
    carriers = [i for i, p in enumerate(parts) if p.size > 1 and _carries_ids(state, p)]
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


def _split(state: Propagation, node: fx.Node, ids: np.ndarray, sizes: tuple) -> tuple:
    """One dim becomes several: one axis carries the ids and the positions along the others
    are tied to it. Returns the labels of the axes and ``{axis: attribute}`` for the carrier
    when a module attribute holds its size. The carrier is the innermost non-1 axis, except
    in a split into attention heads with ``prune_heads``: then the heads axis carries (whole
    heads go) and the head-count attribute follows it; otherwise the width attribute."""
    if not _carries_ids(state, ids):
        return _fresh_dims(state, node, sizes, NEW_DIMENSION), {}
    grid = ids.reshape(sizes)
    heads = _head_split(state, node, sizes)
    carrier = [i for i, s in enumerate(sizes) if s > 1][-1]
    followed = {}
    if heads is not None:
        carrier = heads[0] if state.prune_heads else heads[1]
        followed = {carrier: heads[2].count if state.prune_heads else heads[2].width}
    index = [0] * len(sizes)
    index[carrier] = slice(None)
    anchor = grid[tuple(index)]
    state.unify(grid, np.broadcast_to(anchor.reshape([-1 if i == carrier else 1 for i in range(len(sizes))]), grid.shape))
    fresh = _fresh_dims(state, node, sizes, Reason(BlockKind.RESHAPE, f"{node.name} splits a channel dimension"))
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


def reshape_labels(state: Propagation, node: fx.Node, x: tuple, in_shape: tuple, out_shape: tuple, size_args: Optional[list]) -> tuple:
    groups = _dim_groups(in_shape, out_shape)
    out: list = [np.array([NO_ID]) for _ in out_shape]
    if groups is None:
        state.block(x, Reason(BlockKind.RESHAPE, f"{node.name}: reshape not understood"))
        return _fresh_dims(state, node, out_shape, NEW_DIMENSION)
    followed = {}  # out dim -> the module attribute holding its size
    for ga, gb in groups:
        if len(gb) == 1:
            out[gb[0]] = x[ga[0]] if len(ga) == 1 else _merge(state, node, tuple(x[d] for d in ga))
        elif len(ga) == 1:
            parts, attrs = _split(state, node, x[ga[0]], tuple(out_shape[d] for d in gb))
            for d, ids in zip(gb, parts):
                out[d] = ids
            followed.update({gb[axis]: attr for axis, attr in attrs.items()})
        else:
            state.block(tuple(x[d] for d in ga), Reason(BlockKind.RESHAPE, f"{node.name} regroups several dimensions"))
            for d, ids in zip(gb, _fresh_dims(state, node, tuple(out_shape[d] for d in gb), NEW_DIMENSION)):
                out[d] = ids
    if size_args is not None:
        for d, arg in enumerate(size_args):
            if isinstance(arg, int) and arg != -1 and out_shape[d] > 1:
                literal_size(state, node, out[d], arg, "in its target shape", followed.get(d))
            elif isinstance(arg, fx.Node) and out_shape[d] > 1:
                _size_from_shape(state, node, out[d], state.size_source(arg))
    return tuple(out)


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
    the one int attribute of that value there (updated by surgery); otherwise block the dim."""
    scope = state.qualname(node)
    module = state.module(scope)
    if attribute is not None:
        matches = [attribute] if vars(module).get(attribute) == size else []
    else:
        matches = [k for k, v in vars(module).items() if type(v) is int and v == size and not k.startswith("_")]
    if len(matches) == 1 and _carries_ids(state, ids):
        state.attr(scope, matches[0], ids, lambda _, kept: kept)
    else:
        state.block(ids, Reason(BlockKind.FIXED_SIZE, f"{node.name} has a fixed size {size} {where}"))


def _shape_args(node: fx.Node, first: int) -> list:
    rest = list(node.args[first:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0])
    return rest


def view(state: Propagation, node: fx.Node):
    x = state.labels_of(node.args[0])
    in_spec, out_spec = state.value(node.args[0]), state.value(node)
    return reshape_labels(state, node, x, in_spec.shape, out_spec.shape, _shape_args(node, 1))


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
    return merge_dims(state, node, x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))


def unflatten(state: Propagation, node: fx.Node):
    x = state.labels_of(node.args[0])
    in_spec, out_spec = state.value(node.args[0]), state.value(node)
    dim = _arg(node, 1, "dim") % len(x)
    sizes = list(_arg(node, 2, "sizes"))
    size_args = [None] * dim + sizes + [None] * (len(out_spec.shape) - dim - len(sizes))
    return reshape_labels(state, node, x, in_spec.shape, out_spec.shape, size_args)


def permute(state: Propagation, node: fx.Node):
    x = state.labels_of(node.args[0])
    dims = _shape_args(node, 1) if "dims" not in node.kwargs else list(node.kwargs["dims"])
    return tuple(x[d] for d in dims)


def transpose(state: Propagation, node: fx.Node):
    x = list(state.labels_of(node.args[0]))
    if node.target in ("t", "T") or len(node.args) < 3 and "dim0" not in node.kwargs:
        return tuple(reversed(x))
    d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
    x[d0], x[d1] = x[d1], x[d0]
    return tuple(x)


def unsqueeze(state: Propagation, node: fx.Node):
    x = list(state.labels_of(node.args[0]))
    dim = _arg(node, 1, "dim")
    dim = dim if dim >= 0 else dim + len(x) + 1
    return tuple(x[:dim]) + (np.array([NO_ID]),) + tuple(x[dim:])


def squeeze(state: Propagation, node: fx.Node):
    x = state.labels_of(node.args[0])
    in_shape = state.value(node.args[0]).shape
    dims = _arg(node, 1, "dim")
    dims = set(range(len(x))) if dims is None else {d % len(x) for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
    return tuple(ids for d, ids in enumerate(x) if not (d in dims and in_shape[d] == 1))


def expand(state: Propagation, node: fx.Node):
    x = state.labels_of(node.args[0])
    in_shape, out_shape = state.value(node.args[0]).shape, state.value(node).shape
    sizes = _shape_args(node, 1) if node.target != "expand_as" else [None] * len(out_shape)
    lead = len(out_shape) - len(in_shape)
    fresh = _fresh_dims(state, node, out_shape, Reason(BlockKind.NOT_A_CHANNEL, "broadcast by expand"))
    out = []
    for d, size in enumerate(out_shape):
        src = d - lead
        if src >= 0 and in_shape[src] == size:
            if isinstance(sizes[d], int) and sizes[d] != -1 and size > 1:
                literal_size(state, node, x[src], sizes[d], "in expand")
            out.append(x[src])
        else:
            out.append(fresh[d])
    return tuple(out)


def repeat(state: Propagation, node: fx.Node):
    """``x.repeat(*reps)``: a dim repeated ``r`` times carries its ids ``r`` times over; a count
    computed at run time (known from the recorded output's size) is no channel dim."""
    x = state.labels_of(node.args[0])
    reps = _shape_args(node, 1)
    out_shape = state.value(node).shape
    lead = len(reps) - len(x)
    out = [np.array([NO_ID]) if size == 1 else _fresh_dims(state, node, (size,), _REPEATED)[0] for size in out_shape[:lead]]
    for d, ids in enumerate(x):
        r = reps[d + lead]
        if isinstance(r, int) and (ids.size > 1 or r == 1):
            out.append(np.tile(ids, r))
            continue
        if not isinstance(r, int) and ids.size > 1:
            state.block(ids, Reason(BlockKind.FIXED_SIZE, f"{node.name} repeats this dimension a computed number of times"))
        size = out_shape[d + lead]
        out.append(np.array([NO_ID]) if size == 1 else _fresh_dims(state, node, (size,), _REPEATED)[0])
    return tuple(out)


_REPEATED = Reason(BlockKind.NOT_A_CHANNEL, "repeat")


def cat(state: Propagation, node: fx.Node):
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    parts = [state.labels_of(t) for t in tensors]
    d = dim % len(parts[0])
    out = list(parts[0])
    for other in parts[1:]:
        for k in range(len(out)):
            if k != d:
                state.unify(out[k], other[k])
    out[d] = np.concatenate([p[d] for p in parts])
    return tuple(out)


def stack(state: Propagation, node: fx.Node):
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    parts = [state.labels_of(t) for t in tensors]
    for other in parts[1:]:
        for a, b in zip(parts[0], other):
            state.unify(a, b)
    d = dim % (len(parts[0]) + 1)
    new = _fresh_dims(state, node, (len(parts),), Reason(BlockKind.NOT_A_CHANNEL, "stack dimension"))[0]
    return tuple(parts[0][:d]) + (new,) + tuple(parts[0][d:])


def split(state: Propagation, node: fx.Node):
    """``split`` at given sizes: each part prunes on its own when every size is the one int
    attribute of its value on the calling module (``[self.dim_conv3, self.dim_untouched]``),
    which then follows its part's kept count; any other size (a bare literal, a size split
    evenly by a single int) cannot follow the pruning, and the split dim blocks."""
    x = state.labels_of(node.args[0])
    dim = _arg(node, 2, "dim", 0) % len(x)
    sizes = [o.shape[dim] for o in state.value(node)]
    split_sizes = _arg(node, 1, "split_size_or_sections")
    pieces = _pieces(x, dim, sizes)
    attributes = _attributes_of(state, node, split_sizes) if isinstance(split_sizes, (list, tuple)) else None
    if attributes is None or not _carries_ids(state, x[dim]):
        state.block(x[dim], Reason(BlockKind.FIXED_SIZE, f"{node.name} splits at sizes that cannot follow pruning"))
        return pieces
    for attribute, piece in zip(attributes, pieces):
        state.attr(state.qualname(node), attribute, piece[dim], lambda _, kept: kept)
    return pieces


def _attributes_of(state: Propagation, node: fx.Node, sizes) -> Optional[list]:
    """The calling module's int attribute holding each size (each the only one of its value),
    all different; None when any size is not such an attribute."""
    values = {k: v for k, v in vars(state.module(state.qualname(node))).items() if type(v) is int and not k.startswith("_")}
    names = []
    for size in sizes:
        matches = [k for k, v in values.items() if v == size and k not in names] if isinstance(size, int) else []
        if len(matches) != 1:
            return None
        names.append(matches[0])
    return names


def chunk(state: Propagation, node: fx.Node):
    """chunk(n): the j-th channel of every chunk is one unit, so chunks stay equal."""
    x = state.labels_of(node.args[0])
    n = _arg(node, 1, "chunks")
    dim = _arg(node, 2, "dim", 0) % len(x)
    outs = state.value(node)
    size = state.value(node.args[0]).shape[dim]
    if size % n:
        state.block(x[dim], Reason(BlockKind.FIXED_SIZE, f"{node.name} chunks {size} into unequal parts"))
    elif size > 1:
        blocks = x[dim].reshape(n, -1)
        for k in range(1, n):
            state.unify(blocks[0], blocks[k])
    return _pieces(x, dim, [o.shape[dim] for o in outs])


def _pieces(x: tuple, dim: int, sizes: list) -> tuple:
    bounds = np.cumsum([0] + sizes)
    return tuple(tuple(x[:dim]) + (x[dim][a:b] if b - a > 1 else np.array([NO_ID]),) + tuple(x[dim + 1 :]) for a, b in zip(bounds[:-1], bounds[1:]))


def getitem(state: Propagation, node: fx.Node):
    source, index = node.args
    x = state.labels_of(source)
    value = state.value(source)
    if not isinstance(value, TensorSpec):
        return x[index] if isinstance(x, tuple) and isinstance(index, (int, slice)) else None
    index = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index):
        reason = Reason(BlockKind.NO_RULE, f"{node.name}: advanced indexing")
        state.block(x, reason)
        return state.fresh(state.value(node), node.name, reason)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        used = sum(i is not None for i in index) - 1
        index = index[:at] + (slice(None),) * (len(x) - used) + index[at + 1 :]
    fixed = Reason(BlockKind.COLLAPSED, f"{node.name} indexes a fixed position")
    fresh = state.fresh(state.value(node), f"{node.name} slice", fixed)
    out, d = [], 0
    for item in index:
        if item is None:
            out.append(np.array([NO_ID]))
            continue
        if item == slice(None):
            out.append(x[d])
        else:
            state.block(x[d], fixed)
            if isinstance(item, slice):
                out.append(fresh[len(out)])
        d += 1
    return tuple(out) + tuple(x[d:])
