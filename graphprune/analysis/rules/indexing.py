"""Rules for ops that pick or write positions of one dimension given by values computed at run
time: ``gather``, ``index_select``, advanced indexing (``x[idx]``, ``x[:, idx]``,
``x[torch.arange(B), ids]``) and its writes (``index_put``, which torch.export records for
``x[idx] = y``), ``nonzero`` and one-argument ``where``, ``topk`` / ``sort`` / ``argmax``,
``scatter`` / ``index_add`` / ``index_copy`` / ``index_fill``, and the grouped products of
mixture-of-experts layers (``torch._grouped_mm``).

An index holds positions, which are data: the dimension it indexes keeps no channel identity
(its ids block, with the op named), and the dims it creates carry the index's own labels.
Every dimension the op does not touch keeps its ids position by position, so a channel dim
that only passes through (the width of the tokens a router picks) stays prunable.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
import torch.fx as fx

from graphprune.analysis.channels import NO_ID
from graphprune.tracer import TensorSpec

from ..propagation import Propagation
from ..reasons import BlockKind, Reason
from . import pointwise
from .reshape import arg, fresh_dims

INDEX_VALUES = Reason(BlockKind.NOT_A_CHANNEL, "positions of an index tensor")  # dims an index creates


def _at_run_time(node: fx.Node, verb: str) -> Reason:
    return Reason(BlockKind.COLLAPSED, f"{node.name} {verb} this dimension at positions computed at run time")


def _labels(state: Propagation, node: fx.Node, ref: Any, reason: Reason = INDEX_VALUES) -> tuple:
    """The labels of the tensor ``ref``; fresh ones, blocked with ``reason``, for a tensor made
    from sizes alone (``torch.arange(n)``), which has none."""
    labels = state.labels_of(ref)
    if isinstance(labels, tuple) and all(isinstance(ids, np.ndarray) for ids in labels):
        return labels
    return state.fresh(state.value(ref), f"{node.name} operand", reason)


def _dim(node: fx.Node, index: int, ndim: int, default: Any = None) -> int:
    return arg(node, index, "dim", default) % max(ndim, 1)


# ----- reading values: gather, index_select, topk / sort / argmax, nonzero
def gather(state: Propagation, node: fx.Node):
    """``torch.gather(x, dim, index)``: ``out[p] = x[p with p[dim] = index[p]]``. Along ``dim``
    the positions are data (``x``'s ids block, the output has the index's); along any other dim
    output position ``p`` reads ``x``'s position ``p``, so the index's ids there are ``x``'s,
    where it is as long. A shorter index reads a fixed prefix of ``x``: both block."""
    x, ref = state.labels_of(node.args[0]), arg(node, 2, "index")
    dim = _dim(node, 1, len(x))
    index = _labels(state, node, ref)
    x_shape, i_shape = state.value(node.args[0]).shape, state.value(ref).shape
    state.block(x[dim], _at_run_time(node, "gathers along"))
    for d in range(len(x)):
        if d == dim:
            continue
        if i_shape[d] == x_shape[d]:
            state.unify(x[d], index[d])
        else:
            state.block((x[d], index[d]), Reason(BlockKind.FIXED_SIZE, (
                f"{node.name} gathers from the first {i_shape[d]} of {x_shape[d]} positions of this dimension")))
    return tuple(x[d] if d != dim and i_shape[d] == x_shape[d] else index[d] for d in range(len(index)))


def index_select(state: Propagation, node: fx.Node):
    """``torch.index_select(x, dim, index)``: ``dim`` takes the positions the 1-d ``index``
    holds (data: ``x``'s ids there block); the other dims pass through."""
    x = state.labels_of(node.args[0])
    dim = _dim(node, 1, len(x))
    index = _labels(state, node, arg(node, 2, "index"))
    state.block(x[dim], _at_run_time(node, "selects along"))
    return tuple(x[:dim]) + (index[0] if index else np.array([NO_ID]),) + tuple(x[dim + 1 :])


def top_k(state: Propagation, node: fx.Node):
    """``torch.topk(x, k, dim=-1)``: values and indices, where ``dim`` holds the ``k`` chosen by value."""
    x = state.labels_of(node.args[0])
    out = _ordered(state, node, x, _dim(node, 2, len(x), -1), state.value(node)[0].shape)
    return out, out


def sort(state: Propagation, node: fx.Node):
    """``torch.sort(x, dim=-1)``: values and indices, ``dim`` reordered by value."""
    x = state.labels_of(node.args[0])
    out = _ordered(state, node, x, _dim(node, 1, len(x), -1), state.value(node)[0].shape)
    return out, out


def argsort(state: Propagation, node: fx.Node):
    """``torch.argsort(x, dim=-1)``: the positions of ``dim`` ordered by value."""
    x = state.labels_of(node.args[0])
    return _ordered(state, node, x, _dim(node, 1, len(x), -1), state.value(node).shape)


def _ordered(state: Propagation, node: fx.Node, x: tuple, dim: int, shape: tuple) -> tuple:
    """``x``'s labels with ``dim`` ordered or picked by value: the values there depend on every
    position of it, so its ids block; the output's ``dim`` has fresh ids, no channels."""
    state.block(x[dim], Reason(BlockKind.COLLAPSED, f"{node.name} orders this dimension by value"))
    return tuple(x[:dim]) + fresh_dims(state, node, (shape[dim],), INDEX_VALUES) + tuple(x[dim + 1 :])


def arg_extreme(state: Propagation, node: fx.Node):
    """``torch.argmax(x, dim, keepdim)`` / ``argmin``: the position of the extreme along ``dim``
    (its ids block: a position is data); without ``dim``, over the flattened tensor."""
    x = state.labels_of(node.args[0])
    dim, keepdim = arg(node, 1, "dim"), arg(node, 2, "keepdim", False)
    why = Reason(BlockKind.COLLAPSED, f"{node.name} returns a position along this dimension")
    if dim is None:
        state.block(x, why)
        return tuple(np.array([NO_ID]) for _ in x) if keepdim else ()
    dim %= len(x)
    state.block(x[dim], why)
    return tuple(np.array([NO_ID]) if d == dim else ids for d, ids in enumerate(x) if keepdim or d != dim)


def nonzero(state: Propagation, node: fx.Node):
    """``torch.nonzero(x)`` / ``torch.where(x)``: the positions of ``x``'s nonzero values, as
    one ``(n, ndim)`` tensor or a tuple of ``ndim`` aligned ``(n,)`` tensors: index values, no
    channels; ``x``'s dims block, since their positions are what is returned."""
    x = state.labels_of(node.args[0])
    if isinstance(x, tuple):
        state.block(x, Reason(BlockKind.COLLAPSED, f"{node.name} returns positions along this dimension"))
    value = state.value(node)
    if isinstance(value, TensorSpec):
        return state.fresh(value, node.name, INDEX_VALUES)
    count = fresh_dims(state, node, value[0].shape, INDEX_VALUES) if value else ()
    return tuple(count for _ in value)


_FIELDS = {"values": 0, "indices": 1}


def attribute(state: Propagation, node: fx.Node):
    """``getattr``: ``result.values`` / ``result.indices`` of what topk, sort or max over a dim
    return are its two items; any other attribute is :func:`~.pointwise.attribute`'s."""
    name, labels = node.args[1] if len(node.args) > 1 else None, state.labels_of(node.args[0])
    if name in _FIELDS and isinstance(labels, tuple) and len(labels) == 2 and isinstance(labels[0], tuple):
        return labels[_FIELDS[name]]
    return pointwise.attribute(state, node)


def where(state: Propagation, node: fx.Node):
    """``torch.where(cond)`` is :func:`nonzero` (as a tuple); ``torch.where(cond, a, b)`` is elementwise."""
    if len(node.args) + len(node.kwargs) == 1:
        return nonzero(state, node)
    return pointwise.elementwise(state, node)


# ----- advanced indexing: x[idx], x[:, idx], x[arange(B), ids], and its writes
class _Index(NamedTuple):
    """One index tensor of an index: its labels and shape; a mask (bool) selects over as many
    dims as it has and makes one dim of run-time length (``None`` labels and size)."""

    labels: tuple
    shape: tuple
    mask: bool


def _items(state: Propagation, node: fx.Node, index: tuple) -> list:
    """The items of an index: None, Ellipsis, a slice, ``int`` for one position (a number, or
    one computed: no dim made), or an :class:`_Index`; a tuple of index tensors (the value of
    ``torch.where(mask)``) is spread into its tensors, a literal list is an index of positions."""
    items: list = []
    for item in index:
        value = state.value(item) if isinstance(item, fx.Node) else item
        if isinstance(value, TensorSpec):
            items.append(_Index(_labels(state, node, item), value.shape, value.dtype == torch.bool))
        elif isinstance(item, fx.Node) and isinstance(value, (tuple, list)):
            labels = state.labels_of(item) or state.fresh(value, f"{node.name} index", INDEX_VALUES)
            items += [_Index(ids, spec.shape, spec.dtype == torch.bool) for ids, spec in zip(labels, value)]
        elif isinstance(value, (list, tuple)):
            shape = np.shape(value)
            items.append(_Index(fresh_dims(state, node, shape, INDEX_VALUES), shape, False))
        elif item is None or item is Ellipsis or isinstance(item, slice):
            items.append(item)
        else:
            items.append(int)
    return items


def _width(item: Any) -> int:
    """How many dims of the indexed tensor ``item`` consumes."""
    if isinstance(item, _Index):
        return len(item.shape) if item.mask else 1
    return 0 if item is None or item is Ellipsis else 1


def _spread_ellipsis(items: list, ndim: int) -> Optional[list]:
    """``items`` with an Ellipsis replaced by full slices; None where they consume too many dims."""
    free = ndim - sum(_width(i) for i in items)
    if free < 0 or items.count(Ellipsis) > 1:
        return None
    at = items.index(Ellipsis) if Ellipsis in items else len(items)
    return items[:at] + [slice(None)] * (free if Ellipsis in items else 0) + items[at + 1 :]


def _selection(state: Propagation, node: fx.Node, source: Any, index: tuple, verb: str) -> Optional[list]:
    """The labels of each dim of ``source[index]``, in the order torch gives them (``None`` for
    a dim of new positions: a partial slice's or a mask's), or None if the index cannot be
    read. Positions are dropped first (a select each); the dims of the index tensors, broadcast
    together, replace them where they are adjacent and come first otherwise (numpy's rule)."""
    x = _labels(state, node, source)
    items = _spread_ellipsis(_items(state, node, index), len(x))
    if items is None:
        return None
    out: list = []
    indices: list = []
    slots: list = []
    d = 0
    for item in items:
        if item is None:
            out.append(np.array([NO_ID]))
        elif isinstance(item, _Index):
            width = _width(item)
            if item.mask:  # a mask lies over the dims it selects in: they must keep one size
                for ids, mask_ids in zip(x[d : d + width], item.labels):
                    state.unify(ids, mask_ids)
            state.block(x[d : d + width], _at_run_time(node, verb))
            indices.append(item._replace(labels=(None,), shape=(None,)) if item.mask else item)
            slots.append(len(out))
            out.append(None)
        elif isinstance(item, slice) and item == slice(None):
            out.append(x[d])
        else:
            state.block(x[d], Reason(BlockKind.COLLAPSED, f"{node.name} {verb} this dimension at a fixed position"))
            if isinstance(item, slice):
                out.append(None)
        d += _width(item)
    out += list(x[d:])
    if not indices:
        return out
    broadcast = _broadcast(state, indices)
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return out[: slots[0]] + broadcast + out[slots[-1] + 1 :]
    return broadcast + [ids for k, ids in enumerate(out) if k not in slots]


def _broadcast(state: Propagation, indices: list) -> list:
    """The labels of the index tensors broadcast together (right-aligned, as elementwise ops):
    dims of one length are the same positions, so their ids unify; a size-1 dim couples nothing."""
    width = max(len(i.shape) for i in indices)
    out = []
    for k in range(width):
        present = [(i.labels[j], i.shape[j]) for i in indices for j in [len(i.shape) - width + k] if j >= 0]
        sized = [ids for ids, size in present if size != 1]
        known = [ids for ids in sized if ids is not None]
        for other in known[1:]:
            state.unify(known[0], other)
        out.append(known[0] if known else None if sized else np.array([NO_ID]))
    return out


def advanced_getitem(state: Propagation, node: fx.Node, source: fx.Node, index: tuple):
    """``x[index]`` where ``index`` holds index tensors or positions computed at run time (see
    :func:`_selection`); where the dims found do not match the recorded result, every dim blocks."""
    selection = _selection(state, node, source, index, "indexes")
    shape = state.value(node).shape
    fits = selection is not None and len(selection) == len(shape) and all(
        ids is None or ids.size == size for ids, size in zip(selection, shape))
    if not fits:
        reason = Reason(BlockKind.NO_RULE, f"{node.name}: an index whose result dims are not understood")
        state.block(state.labels_of(source), reason)
        return state.fresh(state.value(node), node.name, reason)
    return tuple(fresh_dims(state, node, (size,), INDEX_VALUES)[0] if ids is None else ids
                 for ids, size in zip(selection, shape))


def index_put(state: Propagation, node: fx.Node):
    """``torch.index_put(x, indices, values)`` (and ``index_put_``): ``x[indices] = values``, a
    missing index (``None``, as torch.export records ``x[:, idx]``) taking a whole dim."""
    source, indices, value = node.args[0], arg(node, 1, "indices"), arg(node, 2, "values")
    _written(state, node, source, tuple(slice(None) if i is None else i for i in indices), value)
    return state.labels_of(source)


def _written(state: Propagation, node: fx.Node, source: Any, index: tuple, value: Any) -> None:
    """``value`` broadcast over ``source[index]``: each of its dims is the same positions as the
    selection's dim it lies over (their ids unify); over new positions (a partial slice, a
    mask) or where the index is not understood, its dims block with ``source``'s."""
    selection = _selection(state, node, source, index, "writes")
    written = _labels(state, node, value, _FIXED_VALUES) if isinstance(state.value(value), TensorSpec) else ()
    if selection is None:
        state.block((state.labels_of(source), written), Reason(BlockKind.NO_RULE, f"{node.name}: an index not read"))
        return
    shape, lead = state.value(value).shape if written else (), len(selection) - len(written)
    for k, ids in enumerate(written):
        over = selection[lead + k] if lead + k >= 0 else None
        if shape[k] == 1:
            continue
        if over is None or over.size != shape[k]:
            state.block(ids, Reason(BlockKind.COLLAPSED, f"{node.name} writes this dimension over new positions"))
        else:
            state.unify(over, ids)


_FIXED_VALUES = Reason(BlockKind.FIXED_SIZE, "values made from sizes alone, which cannot follow the pruning")


# ----- writing values: scatter, index_add / index_copy / index_fill
def scatter(state: Propagation, node: fx.Node):
    """``torch.scatter(x, dim, index, src)`` (``scatter_add``, ``scatter_reduce``, a number for
    ``src``): ``out[p with p[dim] = index[p]] = src[p]``. Along ``dim`` positions are data
    (``x``'s, the index's and ``src``'s ids block); along any other dim, index position ``p``
    is ``x``'s and ``src``'s position ``p``: their ids unify where all are as long, else block."""
    x, index_ref, src_ref = state.labels_of(node.args[0]), arg(node, 2, "index"), arg(node, 3, "src")
    dim = _dim(node, 1, len(x))
    parts = [(x, state.value(node.args[0]).shape), (_labels(state, node, index_ref), state.value(index_ref).shape)]
    if isinstance(state.value(src_ref), TensorSpec):
        parts.append((state.labels_of(src_ref), state.value(src_ref).shape))
    for d in range(len(x)):
        dims = [labels[d] for labels, _ in parts]
        if d != dim and len({shape[d] for _, shape in parts}) == 1:
            for ids in dims[1:]:
                state.unify(dims[0], ids)
        else:
            state.block(dims, _at_run_time(node, "scatters along") if d == dim else Reason(
                BlockKind.FIXED_SIZE, f"{node.name} scatters over a fixed part of this dimension"))
    return x


def index_add(state: Propagation, node: fx.Node):
    """``torch.index_add(x, dim, index, source)`` (``index_copy``; ``index_fill`` with a value):
    ``source``'s positions along ``dim`` go to the positions ``index`` holds (data: both dims
    block); every other dim of ``source`` is ``x``'s, position by position (their ids unify)."""
    x, source = state.labels_of(node.args[0]), arg(node, 3, "source", node.kwargs.get("value"))
    dim = _dim(node, 1, len(x))
    state.block(x[dim], _at_run_time(node, "writes along"))
    state.block(_labels(state, node, arg(node, 2, "index")), _at_run_time(node, "writes along"))
    written = state.labels_of(source) if isinstance(state.value(source), TensorSpec) else ()
    if len(written) == len(x):
        for d, ids in enumerate(written):
            if d == dim:
                state.block(ids, _at_run_time(node, "writes along"))
            else:
                state.unify(x[d], ids)
    elif written:
        state.block((x, written), Reason(BlockKind.NO_RULE, f"{node.name}: a source of another rank"))
    return x


# ----- grouped products (mixture-of-experts layers)
def grouped_mm(state: Propagation, node: fx.Node):
    """``torch._grouped_mm(a, b, offs)``: rows ``offs[g-1]:offs[g]`` of ``a`` (tokens, in) times
    group ``g``'s matrix of ``b`` (groups, in, out), as transformers' experts compute. ``in``
    is contracted (ids unify), ``out`` is ``b``'s; which rows a group takes is data, so the
    groups (experts) block. Without ``offs``, ``a`` (groups, rows, in) is a batch as for bmm."""
    a, b = state.labels_of(node.args[0]), state.labels_of(node.args[1])
    offs, bias = arg(node, 2, "offs"), arg(node, 3, "bias")
    ranks = (2 if offs is not None else 3, 3)
    if bias is None and isinstance(a, tuple) and isinstance(b, tuple) and (len(a), len(b)) == ranks:
        state.unify(a[-1], b[1])
        _keep_aligned(state, b[1])
        _keep_aligned(state, b[2])
        if offs is None:
            state.unify(a[0], b[0])
            return a[0], a[1], b[2]
        state.block(b[0], Reason(BlockKind.COLLAPSED, f"{node.name} takes the rows of each group (expert) at "
                                                      "offsets computed at run time"))
        return a[0], b[2]
    reason = Reason(BlockKind.NO_RULE, f"{node.name}: a grouped product of these ranks, or with a bias")
    state.block((a, b), reason)
    return state.fresh(state.value(node), node.name, reason)


_ALIGNMENT = 8  # torch's grouped_mm kernels take strides of a multiple of 16 bytes: 8 values of bf16


def _keep_aligned(state: Propagation, ids: np.ndarray) -> None:
    """Tie the positions of ``ids`` in runs of ``gcd(size, 8)``, which are then pruned whole:
    every pruned size keeps the alignment the kernel had (for any dtype it ran in)."""
    run = math.gcd(ids.size, _ALIGNMENT)
    if run > 1 and (ids >= 0).all():
        runs = ids.reshape(-1, run)
        for k in range(1, run):
            state.unify(runs[:, 0], runs[:, k])
