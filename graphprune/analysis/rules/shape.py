"""Rules for ops that move, join, split or select dimensions (reshapes are in :mod:`.reshape`).

Exactness principle: a pruned tensor's dims shrink; these rules make sure every position
keeps its identity through the op. A size written as a literal in the traced code cannot
follow a pruned dimension, so a literal size on a dimension that carries ids blocks it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.fx as fx

from graphprune.analysis.channels import NO_ID
from graphprune.tracer import TensorSpec

from ..propagation import Propagation
from ..reasons import BlockKind, Reason
from ..sizes import read_after_init
from .indexing import advanced_getitem
from .reshape import (
    arg,
    assume_read_off_shape,
    attributes_holding,
    carries_ids,
    follow_sizes,
    fresh_dims,
    literal_size,
    shape_args,
)


def permute(state: Propagation, node: fx.Node):
    x = state.labels_of(node.args[0])
    dims = shape_args(node, 1) if "dims" not in node.kwargs else list(node.kwargs["dims"])
    return tuple(x[d] for d in dims)


def transpose(state: Propagation, node: fx.Node):
    x = list(state.labels_of(node.args[0]))
    if node.target in ("t", "T") or len(node.args) < 3 and "dim0" not in node.kwargs:
        return tuple(reversed(x))
    d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
    x[d0], x[d1] = x[d1], x[d0]
    return tuple(x)


def unsqueeze(state: Propagation, node: fx.Node):
    x = list(state.labels_of(node.args[0]))
    dim = arg(node, 1, "dim")
    dim = dim if dim >= 0 else dim + len(x) + 1
    return tuple(x[:dim]) + (np.array([NO_ID]),) + tuple(x[dim:])


def squeeze(state: Propagation, node: fx.Node):
    x = state.labels_of(node.args[0])
    in_shape = state.value(node.args[0]).shape
    dims = arg(node, 1, "dim")
    dims = set(range(len(x))) if dims is None else {d % len(x) for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
    return tuple(ids for d, ids in enumerate(x) if not (d in dims and in_shape[d] == 1))


def expand(state: Propagation, node: fx.Node):
    """``x.expand(*sizes)`` / ``x.expand_as(y)``: a dim kept passes its ids; a size-1 dim
    broadcast to ``n`` holds one value ``n`` times. Broadcast along ``y``'s dims
    (``expand_as``), it takes their ids. An index or mask broadcast along the channels it
    selects (``index.expand_as(src)`` for a scatter) may lose positions as they do, if its
    size follows (:func:`follow_sizes`); a broadcast float dim is no channel dim (it blocks)."""
    x = state.labels_of(node.args[0])
    in_shape, out_shape = state.value(node.args[0]).shape, state.value(node).shape
    like = state.labels_of(node.args[1]) if node.target == "expand_as" else None
    sizes = shape_args(node, 1) if node.target != "expand_as" else [None] * len(out_shape)
    lead = len(out_shape) - len(in_shape)
    selects = not (state.value(node).dtype or torch.float32).is_floating_point
    out = list(state.fresh(state.value(node), f"{node.name} broadcast",
                           None if selects else Reason(BlockKind.NOT_A_CHANNEL, "broadcast by expand")))
    broadcast = []
    for d, size in enumerate(out_shape):
        src = d - lead
        if src >= 0 and in_shape[src] == size:
            if isinstance(sizes[d], int) and sizes[d] != -1 and size > 1:
                literal_size(state, node, x[src], sizes[d], "in expand")
            out[d] = x[src]
        elif isinstance(like, tuple) and len(like) == len(out_shape) and isinstance(like[d], np.ndarray):
            out[d] = like[d]
        elif selects:
            broadcast.append(d)
    follow_sizes(state, node, [out[d] for d in broadcast], tuple(out_shape[d] for d in broadcast),
                 [sizes[d] if sizes[d] is not None else node for d in broadcast])
    return tuple(out)


def repeat(state: Propagation, node: fx.Node):
    """``x.repeat(*reps)``: a dim repeated ``r`` times carries its ids ``r`` times over; a count
    computed at run time (known from the recorded output's size) is no channel dim."""
    x = state.labels_of(node.args[0])
    reps = shape_args(node, 1)
    out_shape = state.value(node).shape
    lead = len(reps) - len(x)
    out = [np.array([NO_ID]) if size == 1 else fresh_dims(state, node, (size,), _REPEATED)[0] for size in out_shape[:lead]]
    for d, ids in enumerate(x):
        r = reps[d + lead]
        if isinstance(r, int) and (ids.size > 1 or r == 1):
            out.append(np.tile(ids, r))
            continue
        if not isinstance(r, int) and ids.size > 1:
            state.block(ids, Reason(BlockKind.FIXED_SIZE, f"{node.name} repeats this dimension a computed number of times"))
        size = out_shape[d + lead]
        out.append(np.array([NO_ID]) if size == 1 else fresh_dims(state, node, (size,), _REPEATED)[0])
    return tuple(out)


_REPEATED = Reason(BlockKind.NOT_A_CHANNEL, "repeat")


def repeat_interleave(state: Propagation, node: fx.Node):
    """``x.repeat_interleave(r, dim)``: each position of ``dim`` repeated ``r`` times in place,
    so its ids ``r`` times each (``[a, a, b, b]``); a channel then owns ``r`` positions. Repeats
    given as a tensor, or no ``dim`` (the flattened input), block."""
    x = state.labels_of(node.args[0])
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if isinstance(repeats, int) and isinstance(dim, int):
        out = list(x)
        out[dim] = np.repeat(x[dim], repeats) if x[dim].size > 1 else fresh_dims(
            state, node, (state.value(node).shape[dim],), _REPEATED)[0]
        return tuple(out)
    why = Reason(BlockKind.NO_RULE, f"{node.name} repeats by a tensor, or over the flattened input")
    state.block(x, why)
    return state.fresh(state.value(node), node.name, why)


def cat(state: Propagation, node: fx.Node):
    """Dims other than ``dim`` unify; ``dim`` joins the pieces' ids. A 1-d empty piece is
    skipped, as torch.cat skips it (an empty KV cache that a first step appends to)."""
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    parts = [state.labels_of(t) for t in tensors if getattr(state.value(t), "shape", None) != (0,)]
    d = dim % len(parts[0])
    out = list(parts[0])
    for other in parts[1:]:
        for k in range(len(out)):
            if k != d:
                state.unify(out[k], other[k])
    out[d] = np.concatenate([_own_ids(state, node, p[d]) for p in parts])
    return tuple(out)


def _own_ids(state: Propagation, node: fx.Node, ids: np.ndarray) -> np.ndarray:
    """``ids`` of a piece along the dim a concat joins; a size-1 piece (a reduction's
    ``keepdim`` output, say) has none, so it gets one of its own, blocked: nothing can shrink it."""
    if ids.size == 1 and ids[0] == NO_ID:
        return state.space.new_set(1, f"{node.name} size-1 piece", Reason(
            BlockKind.FIXED_SIZE, f"{node.name} joins a piece of size 1 along this dimension, which cannot shrink"))
    return ids


def stack(state: Propagation, node: fx.Node):
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    parts = [state.labels_of(t) for t in tensors]
    for other in parts[1:]:
        for a, b in zip(parts[0], other):
            state.unify(a, b)
    d = dim % (len(parts[0]) + 1)
    new = fresh_dims(state, node, (len(parts),), Reason(BlockKind.NOT_A_CHANNEL, "stack dimension"))[0]
    return tuple(parts[0][:d]) + (new,) + tuple(parts[0][d:])


def split(state: Propagation, node: fx.Node):
    """``split`` at given sizes: each part prunes on its own when every size is the one int
    attribute of its value on the calling module (``[self.dim_conv3, self.dim_untouched]``),
    which then follows its part's kept count. ``split`` by one size into equal parts (GPT-2's
    ``split(self.split_size)`` of q, k and v) ties position ``j`` of every part, as
    :func:`chunk` does, when that size follows the pruning (see :func:`_follows`). Any other
    size cannot follow, and the split dim blocks."""
    x = state.labels_of(node.args[0])
    dim = arg(node, 2, "dim", 0) % len(x)
    sizes = [o.shape[dim] for o in state.value(node)]
    split_sizes = arg(node, 1, "split_size_or_sections")
    pieces = _pieces(x, dim, sizes)
    equal = not isinstance(split_sizes, (list, tuple))
    if not carries_ids(state, x[dim]):
        attributes = None
    elif equal:
        attributes = [] if len(set(sizes)) == 1 and _follows(state, node, x[dim], split_sizes, len(sizes)) else None
    else:
        attributes = _attributes_of(state, node, split_sizes)
    if attributes is None:
        state.block(x[dim], Reason(BlockKind.FIXED_SIZE, f"{node.name} splits at sizes that cannot follow pruning"))
        return pieces
    for attribute, piece in zip(attributes, pieces):
        state.attr(state.qualname(node), attribute, piece[dim], lambda _, kept: kept)
    if equal:
        _tie_parts(state, x[dim], len(sizes))
    return pieces


def _follows(state: Propagation, node: fx.Node, ids: np.ndarray, size, parts: int) -> bool:
    """Whether the size of each of ``parts`` equal parts of the dim ``ids`` follows the pruning:
    read off that dim's shape, or the one int attribute of its value on the calling module
    (then updated), or under torch.export a number taken to be read off a shape (audited)."""
    if isinstance(size, fx.Node):
        return _divisor_read_off(state, size, ids) == parts
    if type(size) is not int:
        return False
    names = _split_attributes(state, node, size)
    if len(names) == 1:
        state.attr(state.qualname(node), names[0], ids[:size], lambda _, kept: kept)
        return True
    return assume_read_off_shape(state, node, ids[:size], size, "as a split size")


def _divisor_read_off(state: Propagation, size: fx.Node, ids: np.ndarray) -> Optional[int]:
    """``n`` where the size node ``size`` is the length of the dim ``ids`` divided by ``n``
    (``x.shape[-1] // n``, see :func:`~graphprune.analysis.rules.pointwise.metadata`), else None."""
    source = state.size_source(size)
    if source is None or not isinstance(source[0], np.ndarray) or not np.array_equal(source[0], ids):
        return None
    return source[1]


def _tie_parts(state: Propagation, ids: np.ndarray, parts: int) -> None:
    """Position ``j`` of each of ``parts`` equal parts of ``ids`` becomes one unit."""
    blocks = ids.reshape(parts, -1)
    for k in range(1, parts):
        state.unify(blocks[0], blocks[k])


def _split_attributes(state: Propagation, node: fx.Node, size: int, exclude: tuple = ()) -> list:
    """The int attributes of the module calling ``node`` that may hold a split size ``size``
    (:func:`attributes_holding`): where several do, those its code reads outside ``__init__``
    (a split size is read there)."""
    names = attributes_holding(state, node, size, exclude)
    return names if len(names) < 2 else read_after_init(state.module(state.qualname(node)), names)


def _attributes_of(state: Propagation, node: fx.Node, sizes) -> Optional[list]:
    """The calling module's int attribute holding each size (each the only one of its value),
    all different; None when any size is not such an attribute."""
    names = []
    for size in sizes:
        matches = _split_attributes(state, node, size, exclude=tuple(names)) if isinstance(size, int) else []
        if len(matches) != 1:
            return None
        names.append(matches[0])
    return names


def chunk(state: Propagation, node: fx.Node):
    """chunk(n): the j-th channel of every chunk is one unit, so chunks stay equal."""
    x = state.labels_of(node.args[0])
    n = arg(node, 1, "chunks")
    dim = arg(node, 2, "dim", 0) % len(x)
    outs = state.value(node)
    size = state.value(node.args[0]).shape[dim]
    if size % n:
        state.block(x[dim], Reason(BlockKind.FIXED_SIZE, f"{node.name} chunks {size} into unequal parts"))
    elif size > 1:
        _tie_parts(state, x[dim], n)
    return _pieces(x, dim, [o.shape[dim] for o in outs])


def _pieces(x: tuple, dim: int, sizes: list) -> tuple:
    bounds = np.cumsum([0] + sizes)
    return tuple(tuple(x[:dim]) + (x[dim][a:b] if b - a > 1 else np.array([NO_ID]),) + tuple(x[dim + 1 :]) for a, b in zip(bounds[:-1], bounds[1:]))


def getitem(state: Propagation, node: fx.Node):
    source, index = node.args
    x = state.labels_of(source)
    value = state.value(source)
    if not isinstance(value, TensorSpec):
        if isinstance(x, dict):  # a dict of tensors (one input holding several)
            return x.get(index) if isinstance(index, (str, int)) else None
        return x[index] if isinstance(x, tuple) and isinstance(index, (int, slice)) else None
    index = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index):
        return advanced_getitem(state, node, source, index)  # index tensors, computed positions
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
            part = x[d]
        else:
            part = _equal_part(state, node, x[d], item) if isinstance(item, slice) else None
        if part is not None:
            out.append(part)
        else:
            state.block(x[d], fixed)
            if isinstance(item, slice):
                out.append(fresh[len(out)])
        d += 1
    return tuple(out) + tuple(x[d:])


def _equal_part(state: Propagation, node: fx.Node, ids: np.ndarray, item: slice) -> Optional[np.ndarray]:
    """The ids of a slice that takes one of ``n`` equal parts of the dim ``ids``, with bounds
    that follow its size (``x[..., : x.shape[-1] // 2]``, RoPE's ``rotate_half``), or None.
    Position ``j`` of every part is then one unit, as for :func:`chunk`, so that the parts
    stay equal. A bound follows when read off that dim's shape; under torch.export, a number
    is taken to be, as an assumption the audit checks; any other literal does not."""
    bounds = [item.start, item.stop]
    values = [state.value(b) if isinstance(b, fx.Node) else b for b in bounds]
    if item.step not in (None, 1) or not all(v is None or type(v) is int for v in values) or not carries_ids(state, ids):
        return None
    size = ids.size
    start, stop, _ = slice(*values).indices(size)
    length = stop - start
    if not 0 < length < size or size % length or start % length:
        return None
    inner = [(b, v) for b, v in zip(bounds, (start, stop)) if 0 < v < size]
    for bound, value in inner:
        if isinstance(bound, fx.Node):
            divisor = _divisor_read_off(state, bound, ids)
            if divisor is None or value * divisor != size:
                return None
        elif state.node_attrs(node).get("front_end") != "export":
            return None
    for bound, value in inner:
        if not isinstance(bound, fx.Node):
            assume_read_off_shape(state, node, ids, value, "as a slice bound")
    _tie_parts(state, ids, size // length)
    return ids[start:stop]


def glu(state: Propagation, node: fx.Node):
    """``F.glu(x, dim)`` and ``nn.GLU``: ``a * sigmoid(b)`` of the two halves of ``dim``, so
    channel ``i`` of the output is channels ``i`` and ``i + n/2`` of ``x``, one unit (as
    :func:`chunk`'s parts)."""
    x = state.labels_of(node.args[0])
    dim = state.module(state.qualname(node)).dim if node.op == "call_module" else arg(node, 1, "dim", -1)
    dim %= len(x)
    halves = equal_parts(state, node, x, dim, [state.value(node).shape[dim]] * 2)
    return halves[0]


def equal_parts(state: Propagation, node: fx.Node, x: tuple, dim: int, sizes: list) -> tuple:
    """The pieces of ``x`` cut along ``dim`` at ``sizes``: equal parts tie position ``j`` of
    each (they stay equal); unequal ones block the dim."""
    if len(set(sizes)) > 1:
        state.block(x[dim], Reason(BlockKind.FIXED_SIZE, f"{node.name} cuts {sum(sizes)} into unequal parts"))
    elif x[dim].size > 1:
        _tie_parts(state, x[dim], len(sizes))
    return _pieces(x, dim, sizes)


def tensor_split(state: Propagation, node: fx.Node):
    """``torch.tensor_split(x, sections_or_indices, dim)``: ``n`` sections of equal size are tied
    as :func:`chunk`'s parts; split indices follow the pruning where each is the one int
    attribute of its value on the calling module (updated to the kept count before it), or
    under torch.export a number taken to be read off a shape (audited); otherwise the dim blocks."""
    x = state.labels_of(node.args[0])
    dim = arg(node, 2, "dim", 0) % len(x)
    how = arg(node, 1, "indices_or_sections", node.kwargs.get("sections", node.kwargs.get("indices")))
    sizes = [o.shape[dim] for o in state.value(node)]
    if type(how) is int:
        return equal_parts(state, node, x, dim, sizes)
    if not (isinstance(how, (list, tuple)) and _bounds_follow(state, node, x[dim], how)):
        state.block(x[dim], Reason(BlockKind.FIXED_SIZE, f"{node.name} splits at indices that cannot follow pruning"))
    return _pieces(x, dim, sizes)


def _bounds_follow(state: Propagation, node: fx.Node, ids: np.ndarray, bounds) -> bool:
    """Whether every split index in ``bounds`` (increasing, inside the dim ``ids``) follows the
    count of the positions before it: see :func:`tensor_split`."""
    scope, names, last = state.qualname(node), [], 0
    for bound in bounds:
        if type(bound) is not int or not last < bound < ids.size:
            return False
        last = bound
        found = _split_attributes(state, node, bound, exclude=tuple(names))
        if len(found) == 1:
            names.append(found[0])
            state.attr(scope, found[0], ids[:bound], lambda _, kept: kept)
        elif not assume_read_off_shape(state, node, ids[:bound], bound, "as a split index"):
            return False
    return True
